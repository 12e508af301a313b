//! OpenStack Trove instances and replication sets (endpoints TROVE-* of
//! ../shared/spec/trove.md).
//!
//! A Trove instance is a database instance of the inventory (`crate::inventory`: host,
//! flavor's vCPUs and RAM, datastore, volume, server status) plus what Trove adds, kept
//! here: the flavor id, the task (`BUILDING`, `PROMOTING`, …), the datastore service
//! status, the replication set (`replica_of` / `replicas`), the pair that feeds a replica,
//! the last fault, and the job the instance is busy with. An inventory database without a
//! record here (one an agent declared) is a Trove instance with a derived record; the
//! first action stores it.
//!
//! A replica is an instance on another host whose volume is the target of one
//! replication pair (`crate::replication`) from its source's volume. A set with several
//! replicas has one pair per replica, all from the source.
//!
//! Every action is one command that checks everything first, then stages the instances'
//! transient task, the pair operations and one job (`troveRestart`, `trovePromote`, …,
//! visible at `/drplane/v1/jobs`). When the job ends, [`on_job_end`] (after the pairs moved
//! on) settles every instance the job held: `ACTIVE` + `HEALTHY`, or `ERROR` with a
//! fault. Membership of a replication set changes only there, in one apply, from the
//! pairs' real end state: a set has exactly one source at every moment.
//!
//! | action | tasks of its job |
//! |---|---|
//! | create | CreateVolume → Start |
//! | create replica | per replica: pair Create (CreateTarget → full Sync) |
//! | restart / resize flavor / rebuild / upgrade | Restart (guest) |
//! | mgmt stop | Stop |
//! | mgmt reboot | Stop → Start |
//! | resize volume | ResizeVolume on the instance and each replica, then a Sync of each replica's pair |
//! | promote R (source M, others X) | pair M→R PlannedFailover{keep_replicating} (final sync, fence M, promote R); pairs M→X deleted (targets kept); new pairs R→X fully synced (only changed blocks move) |
//! | eject M (elect B: the replica whose pair has the latest recovery point) | pair M→B UnplannedFailover (promote B); pairs M→X deleted; new pairs B→X synced; M left standalone |
//! | detach X | Promote(X's volume); pair M→X deleted (target kept) |
//! | mgmt migrate | Stop → Migrate (target host pulls) → DeleteVolume(old) → Start |
//! | delete | Stop → DeleteVolume (or the feeding pair's Delete with its target) |
//!
//! Column families:
//! - `trove`: `i/<instance id>` → [`TroveInstance`];
//! - `trove_index`: `j/<job id>\0<instance id>` → () while the instance is busy with the job.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{CommandResult, Outcome};
use crate::error::{CommandError, StoreError};
use crate::inventory::{
    self, validate_id, validate_project, DatabaseInstance, DatabaseStatus, Datastore, Flavor, Host,
    HostState, ResourceAmount, Volume, CF_DATABASES, CF_HOSTS,
};
use crate::jobs::{
    self, Job, JobStatus, MigrateDisk, NewJob, NewTask, TaskKind, VolumeLayout, VolumeRef,
    WorkloadAction,
};
use crate::replication::{self, NewPair, Pair, PairOp};
use crate::store::Store;
use crate::txn::Txn;

pub const CF_TROVE: &str = "trove";
pub const CF_TROVE_INDEX: &str = "trove_index";

pub const CFS: &[&str] = &[CF_TROVE, CF_TROVE_INDEX];

/// Trove sizes volumes in GB; drplane counts them in GiB.
pub const GIB: u64 = 1 << 30;
/// `max_accepted_volume_size` (Trove's code default): larger volumes answer 413.
pub const MAX_VOLUME_GB: u64 = 10;
/// `replica_count` bounds.
pub const REPLICA_COUNT_MAX: usize = 3;
/// `agent_heartbeat_expiry`: a source that heartbeated more recently cannot be ejected.
pub const HEARTBEAT_EXPIRY_MS: u64 = 90_000;
/// Seconds between periodic syncs of a replica's pair.
pub const REPLICA_SYNC_INTERVAL_S: u32 = 30;
/// Attempts of each task of a Trove job.
pub const TASK_ATTEMPTS: u32 = 5;
/// Longest datastore version, image id or fault text kept.
pub const TEXT_MAX: usize = 255;
/// `workload_kind` of the task that creates an instance's volume (the agent makes it a
/// `database` volume; the block sync copies it to and from the `disk` volumes that replica
/// and migration targets are made as).
pub const VOLUME_KIND: &str = "database";
/// Default datastore of a new instance.
pub const DEFAULT_DATASTORE: (&str, &str) = ("mysql", "8.0");

/// A flavor (Nova's, as Trove shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TroveFlavor {
    pub id: &'static str,
    pub name: &'static str,
    pub vcpus: u32,
    pub ram_mb: u64,
}

/// The flavors drplane offers (a fixed catalogue: every node knows the same).
pub const FLAVORS: &[TroveFlavor] = &[
    TroveFlavor {
        id: "1",
        name: "m1.tiny",
        vcpus: 1,
        ram_mb: 512,
    },
    TroveFlavor {
        id: "2",
        name: "m1.small",
        vcpus: 1,
        ram_mb: 2048,
    },
    TroveFlavor {
        id: "3",
        name: "m1.medium",
        vcpus: 2,
        ram_mb: 4096,
    },
    TroveFlavor {
        id: "4",
        name: "m1.large",
        vcpus: 4,
        ram_mb: 8192,
    },
    TroveFlavor {
        id: "5",
        name: "m1.xlarge",
        vcpus: 8,
        ram_mb: 16384,
    },
];

pub fn flavor(id: &str) -> Option<&'static TroveFlavor> {
    FLAVORS.iter().find(|f| f.id == id)
}

/// The flavor id of an inventory flavor: the catalogue's match, else `custom`.
pub fn flavor_id_for(f: &Flavor) -> String {
    FLAVORS
        .iter()
        .find(|x| x.vcpus == f.vcpus && x.ram_mb == f.ram_mb)
        .map_or_else(|| "custom".to_string(), |x| x.id.to_string())
}

/// Trove's instance task (`InstanceTasks`), which drives `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TroveTask {
    None,
    Building,
    Rebooting,
    Resizing,
    Migrating,
    Promoting,
    Ejecting,
    Detaching,
    Deleting,
    Upgrading,
    BuildingError,
    PromotionError,
    EjectionError,
}

impl TroveTask {
    pub fn is_error(self) -> bool {
        matches!(
            self,
            TroveTask::BuildingError | TroveTask::PromotionError | TroveTask::EjectionError
        )
    }

    /// The task's name (`task status was …`).
    pub fn name(self) -> &'static str {
        match self {
            TroveTask::None => "NONE",
            TroveTask::Building => "BUILDING",
            TroveTask::Rebooting => "REBOOTING",
            TroveTask::Resizing => "RESIZING",
            TroveTask::Migrating => "MIGRATING",
            TroveTask::Promoting => "PROMOTING",
            TroveTask::Ejecting => "EJECTING",
            TroveTask::Detaching => "DETACHING",
            TroveTask::Deleting => "DELETING",
            TroveTask::Upgrading => "UPGRADING",
            TroveTask::BuildingError => "BUILDING_ERROR",
            TroveTask::PromotionError => "PROMOTION_ERROR",
            TroveTask::EjectionError => "EJECTION_ERROR",
        }
    }

    /// `task_description` of the mgmt views.
    pub fn description(self) -> &'static str {
        match self {
            TroveTask::None => "No tasks for the instance.",
            TroveTask::Building => "The instance is building.",
            TroveTask::Rebooting => "The instance is rebooting.",
            TroveTask::Resizing => "Resizing the instance.",
            TroveTask::Migrating => "Migrating the instance.",
            TroveTask::Promoting => "Promoting the instance to replica source.",
            TroveTask::Ejecting => "Ejecting the instance's replica source.",
            TroveTask::Detaching => "Detaching the instance from its replica source.",
            TroveTask::Deleting => "Deleting the instance.",
            TroveTask::Upgrading => "Upgrading the instance.",
            TroveTask::BuildingError => "Build error: see the fault.",
            TroveTask::PromotionError => "Replica promotion error: see the fault.",
            TroveTask::EjectionError => "Replica source ejection error: see the fault.",
        }
    }
}

/// The datastore service's status (Trove's `ServiceStatuses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceStatus {
    New,
    Healthy,
    Restarting,
    Shutdown,
    /// After `reset_status`: shown as `ERROR`.
    Unknown,
    Failed,
}

impl ServiceStatus {
    pub fn api_name(self) -> &'static str {
        match self {
            ServiceStatus::New => "NEW",
            ServiceStatus::Healthy => "HEALTHY",
            ServiceStatus::Restarting => "RESTARTING",
            ServiceStatus::Shutdown => "SHUTDOWN",
            ServiceStatus::Unknown => "ERROR",
            ServiceStatus::Failed => "FAILED",
        }
    }

    /// Whether §2.3 lets an action start with this service status.
    fn allows_action(self) -> bool {
        matches!(self, ServiceStatus::Healthy | ServiceStatus::Shutdown)
    }
}

/// Why the last operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub message: String,
    pub details: Option<String>,
    pub created_ms: u64,
}

/// `access` of an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TroveAccess {
    pub is_public: bool,
    pub allowed_cidrs: Vec<String>,
}

/// What the job an instance is busy with does to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingOp {
    Create,
    CreateReplica,
    Restart,
    ResizeFlavor {
        flavor_id: String,
    },
    ResizeVolume {
        size_bytes: u64,
    },
    /// `new_source` is promoted; `old_source` and `others` are re-pointed to it. `pairs`:
    /// instance id → the pair that feeds it when the promotion took effect.
    Promote {
        new_source: String,
        old_source: String,
        pairs: BTreeMap<String, String>,
    },
    /// `new_source` (elected) is promoted; `old_source` is left standalone.
    Eject {
        new_source: String,
        old_source: String,
        pairs: BTreeMap<String, String>,
    },
    Stop,
    Reboot,
    Migrate {
        host: String,
        pool: String,
    },
    Rebuild {
        image_id: String,
    },
    Detach,
    Upgrade {
        version: String,
    },
    Delete,
}

/// Trove's own state of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TroveInstance {
    pub id: String,
    pub project: String,
    pub flavor_id: String,
    pub task: TroveTask,
    pub service: ServiceStatus,
    /// The source of this replica.
    pub replica_of: Option<String>,
    /// The replicas of this source, in the order they joined.
    pub replicas: Vec<String>,
    /// The pair whose target is this instance's volume (a replica's feed; after an eject,
    /// the failed-over pair that points at the ejected source).
    pub feed_pair: Option<String>,
    pub busy_job: Option<String>,
    pub pending: Option<PendingOp>,
    pub fault: Option<Fault>,
    pub access: TroveAccess,
    pub locality: Option<String>,
    pub region: Option<String>,
    pub availability_zone: Option<String>,
    pub image_id: Option<String>,
    /// Set when the instance was deleted (with its last inventory record).
    pub deleted_at_ms: Option<u64>,
    pub deleted_record: Option<DatabaseInstance>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub service_updated_ms: u64,
}

impl TroveInstance {
    /// The record of an inventory database that Trove never touched.
    pub fn derived(db: &DatabaseInstance) -> Self {
        TroveInstance {
            id: db.id.clone(),
            project: db.project.clone(),
            flavor_id: flavor_id_for(&db.flavor),
            task: TroveTask::None,
            service: match db.status {
                DatabaseStatus::Active => ServiceStatus::Healthy,
                DatabaseStatus::Build => ServiceStatus::New,
                DatabaseStatus::Reboot => ServiceStatus::Restarting,
                DatabaseStatus::Shutdown => ServiceStatus::Shutdown,
                DatabaseStatus::Error => ServiceStatus::Failed,
            },
            replica_of: None,
            replicas: Vec::new(),
            feed_pair: None,
            busy_job: None,
            pending: None,
            fault: None,
            access: TroveAccess::default(),
            locality: None,
            region: None,
            availability_zone: None,
            image_id: None,
            deleted_at_ms: None,
            deleted_record: None,
            created_at_ms: db.created_at_ms,
            updated_at_ms: db.updated_at_ms,
            service_updated_ms: db.updated_at_ms,
        }
    }
}

/// An instance as the API shows it: its inventory record and Trove's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub db: DatabaseInstance,
    pub trove: TroveInstance,
}

impl InstanceView {
    /// `status` (spec §2.2).
    pub fn status(&self) -> &'static str {
        let t = self.trove.task;
        if t.is_error() {
            return "ERROR";
        }
        match t {
            TroveTask::Building => {
                return if self.db.status == DatabaseStatus::Error {
                    "ERROR"
                } else {
                    "BUILD"
                }
            }
            TroveTask::Rebooting => return "REBOOT",
            TroveTask::Resizing | TroveTask::Migrating => return "RESIZE",
            TroveTask::Upgrading => return "UPGRADE",
            TroveTask::Promoting => return "PROMOTE",
            TroveTask::Ejecting => return "EJECT",
            TroveTask::Detaching => return "DETACH",
            TroveTask::Deleting => {
                return if self.db.status == DatabaseStatus::Error {
                    "ERROR"
                } else {
                    "SHUTDOWN"
                }
            }
            _ => {}
        }
        match self.db.status {
            DatabaseStatus::Build => "BUILD",
            DatabaseStatus::Active => "ACTIVE",
            DatabaseStatus::Shutdown => "SHUTDOWN",
            DatabaseStatus::Reboot => "REBOOT",
            DatabaseStatus::Error => "ERROR",
        }
    }

    /// `operating_status`: empty while a task runs or the server is not active.
    pub fn operating_status(&self) -> &'static str {
        if self.trove.task != TroveTask::None
            || self.trove.busy_job.is_some()
            || self.db.status != DatabaseStatus::Active
        {
            return "";
        }
        self.trove.service.api_name()
    }

    pub fn volume_gb(&self) -> u64 {
        self.db.volume.size_bytes.div_ceil(GIB).max(1)
    }
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

/// TROVE-INST-CREATE: a new instance, or `ids.len()` replicas of `replica_of`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateInstance {
    pub project: String,
    /// One per instance to create (replicas: `replica_count`).
    pub ids: Vec<String>,
    pub name: String,
    pub flavor_id: Option<String>,
    pub volume_gb: Option<u64>,
    pub datastore: Option<Datastore>,
    pub replica_of: Option<String>,
    pub availability_zone: Option<String>,
    pub locality: Option<String>,
    pub region: Option<String>,
    pub access: Option<TroveAccess>,
    pub job_id: String,
}

/// An action on an existing instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TroveAction {
    /// TROVE-ACT-RESTART
    Restart,
    /// TROVE-ACT-RESIZE-FLAVOR
    ResizeFlavor { flavor_id: String },
    /// TROVE-ACT-RESIZE-VOLUME
    ResizeVolume { size_gb: u64 },
    /// TROVE-ACT-PROMOTE
    Promote,
    /// TROVE-ACT-EJECT
    Eject,
    /// TROVE-ACT-RESET-STATUS
    ResetStatus,
    /// TROVE-MGMT-STOP
    Stop,
    /// TROVE-MGMT-REBOOT
    Reboot,
    /// TROVE-MGMT-MIGRATE
    Migrate { host: Option<String> },
    /// TROVE-MGMT-RESET-TASK
    ResetTask,
    /// TROVE-MGMT-REBUILD
    Rebuild { image_id: String },
    /// TROVE-INST-UPDATE `{"replica_of": null}`
    Detach,
    /// TROVE-INST-UPDATE `{"datastore_version": …}`
    Upgrade { version: String },
    /// TROVE-INST-DELETE
    Delete,
}

impl TroveAction {
    pub fn name(&self) -> &'static str {
        match self {
            TroveAction::Restart => "restart",
            TroveAction::ResizeFlavor { .. } => "resize_flavor",
            TroveAction::ResizeVolume { .. } => "resize_volume",
            TroveAction::Promote => "promote_to_replica_source",
            TroveAction::Eject => "eject_replica_source",
            TroveAction::ResetStatus => "reset_status",
            TroveAction::Stop => "stop",
            TroveAction::Reboot => "reboot",
            TroveAction::Migrate { .. } => "migrate",
            TroveAction::ResetTask => "reset_task_status",
            TroveAction::Rebuild { .. } => "rebuild",
            TroveAction::Detach => "detach_replica",
            TroveAction::Upgrade { .. } => "upgrade",
            TroveAction::Delete => "delete",
        }
    }

    fn job_type(&self) -> &'static str {
        match self {
            TroveAction::Restart => "troveRestart",
            TroveAction::ResizeFlavor { .. } => "troveResizeFlavor",
            TroveAction::ResizeVolume { .. } => "troveResizeVolume",
            TroveAction::Promote => "trovePromote",
            TroveAction::Eject => "troveEject",
            TroveAction::ResetStatus => "troveResetStatus",
            TroveAction::Stop => "troveStop",
            TroveAction::Reboot => "troveReboot",
            TroveAction::Migrate { .. } => "troveMigrate",
            TroveAction::ResetTask => "troveResetTask",
            TroveAction::Rebuild { .. } => "troveRebuild",
            TroveAction::Detach => "troveDetachReplica",
            TroveAction::Upgrade { .. } => "troveUpgrade",
            TroveAction::Delete => "troveDelete",
        }
    }
}

/// Commands of this family. Add new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TroveCommand {
    /// TROVE-INST-CREATE. -> `TroveOutcome::Accepted` (ids created) or `Refused`.
    Create(Box<CreateInstance>),
    /// An action on instance `id`, visible only in project `scope` (None: any project,
    /// the admin `mgmt` paths). -> `TroveOutcome::Accepted` or `Refused`.
    Act {
        id: String,
        scope: Option<String>,
        action: TroveAction,
        job_id: String,
    },
    /// TROVE-INST-UPDATE's synchronous part: rename, access. -> `Accepted` or `Refused`.
    Update {
        id: String,
        scope: Option<String>,
        name: Option<String>,
        access: Option<TroveAccess>,
    },
}

/// Why Trove refuses a request, by Trove's exception classes (the API maps them to
/// statuses: 400, 401, 403, 404, 413, 422, 501).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    BadRequest,
    /// Trove's `Forbidden` exception, which it answers 401.
    Unauthorized,
    Forbidden,
    NotFound,
    OverLimit,
    /// The instance is not in a state that allows the action.
    Unprocessable,
    NotImplemented,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

fn refuse(kind: RefusalKind, message: impl Into<String>) -> Refusal {
    Refusal {
        kind,
        message: message.into(),
    }
}

fn bad(message: impl Into<String>) -> Refusal {
    refuse(RefusalKind::BadRequest, message)
}

/// What this family's commands produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TroveOutcome {
    /// Accepted; the instances it created or acted on and its job, if it runs one.
    Accepted {
        ids: Vec<String>,
        job_id: Option<String>,
    },
    /// Refused; nothing was written.
    Refused(Refusal),
}

/// Instance names: 1 to 255 bytes with at least one letter or digit, no control character.
pub fn validate_name(name: &str) -> Result<(), CommandError> {
    if name.is_empty()
        || name.len() > 255
        || name.chars().any(char::is_control)
        || !name.chars().any(char::is_alphanumeric)
    {
        return Err(CommandError::invalid(
            "name",
            "must be 1 to 255 characters with at least one letter or digit",
        ));
    }
    Ok(())
}

fn validate_text(field: &str, s: &str) -> Result<(), CommandError> {
    if s.is_empty() || s.len() > TEXT_MAX || s.chars().any(char::is_control) {
        return Err(CommandError::invalid(
            field,
            format!("must be 1 to {TEXT_MAX} bytes without control characters"),
        ));
    }
    Ok(())
}

fn validate_access(a: &TroveAccess) -> Result<(), CommandError> {
    if a.allowed_cidrs.len() > 64 {
        return Err(CommandError::invalid("access.allowed_cidrs", "at most 64"));
    }
    for c in &a.allowed_cidrs {
        validate_text("access.allowed_cidrs", c)?;
    }
    Ok(())
}

impl TroveCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            TroveCommand::Create(c) => {
                validate_project(&c.project)?;
                if c.ids.is_empty() || c.ids.len() > REPLICA_COUNT_MAX {
                    return Err(CommandError::invalid(
                        "ids",
                        format!("give 1 to {REPLICA_COUNT_MAX} instance ids"),
                    ));
                }
                for id in &c.ids {
                    validate_id("id", id)?;
                }
                validate_name(&c.name)?;
                validate_id("job_id", &c.job_id)?;
                if let Some(f) = &c.flavor_id {
                    validate_text("flavorRef", f)?;
                }
                if let Some(r) = &c.replica_of {
                    validate_id("replica_of", r)?;
                }
                if let Some(d) = &c.datastore {
                    validate_text("datastore.type", &d.kind)?;
                    validate_text("datastore.version", &d.version)?;
                }
                for s in [&c.availability_zone, &c.locality, &c.region]
                    .into_iter()
                    .flatten()
                {
                    validate_text("instance", s)?;
                }
                if let Some(a) = &c.access {
                    validate_access(a)?;
                }
                Ok(())
            }
            TroveCommand::Act {
                id,
                scope,
                action,
                job_id,
            } => {
                validate_id("id", id)?;
                if let Some(s) = scope {
                    validate_project(s)?;
                }
                validate_id("job_id", job_id)?;
                match action {
                    TroveAction::ResizeFlavor { flavor_id } => {
                        validate_text("flavorRef", flavor_id)
                    }
                    TroveAction::Migrate { host: Some(h) } => {
                        inventory::validate_host_name("host", h)
                    }
                    TroveAction::Rebuild { image_id } => validate_text("image_id", image_id),
                    TroveAction::Upgrade { version } => validate_text("datastore_version", version),
                    _ => Ok(()),
                }
            }
            TroveCommand::Update {
                id,
                scope,
                name,
                access,
            } => {
                validate_id("id", id)?;
                if let Some(s) = scope {
                    validate_project(s)?;
                }
                if let Some(n) = name {
                    validate_name(n)?;
                }
                if let Some(a) = access {
                    validate_access(a)?;
                }
                Ok(())
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            TroveCommand::Create(_) => "trove_create",
            TroveCommand::Act { .. } => "trove_action",
            TroveCommand::Update { .. } => "trove_update",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------

fn inst_key(id: &str) -> Vec<u8> {
    format!("i/{id}").into_bytes()
}

fn job_key(job: &str, id: &str) -> Vec<u8> {
    let mut k = format!("j/{job}").into_bytes();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn load_db(txn: &Txn<'_>, id: &str) -> Result<Option<DatabaseInstance>, StoreError> {
    txn.get_record(CF_DATABASES, id.as_bytes())
}

fn load_trove(txn: &Txn<'_>, id: &str) -> Result<Option<TroveInstance>, StoreError> {
    txn.get_record(CF_TROVE, &inst_key(id))
}

/// A live instance (inventory record present, not deleted), as apply sees it.
fn load_view(txn: &Txn<'_>, id: &str) -> Result<Option<InstanceView>, StoreError> {
    let Some(db) = load_db(txn, id)? else {
        return Ok(None);
    };
    let trove = match load_trove(txn, id)? {
        Some(t) if t.deleted_at_ms.is_none() => t,
        _ => TroveInstance::derived(&db),
    };
    Ok(Some(InstanceView { db, trove }))
}

fn save_trove(txn: &mut Txn<'_>, t: &TroveInstance) -> Result<(), StoreError> {
    txn.put_record(CF_TROVE, &inst_key(&t.id), t)
}

fn volume_ref(db: &DatabaseInstance) -> VolumeRef {
    VolumeRef {
        host: db.host.clone(),
        pool: db.volume.pool.clone(),
        volume_id: db.volume.id.clone(),
        path: db.volume.path.clone(),
        size_bytes: db.volume.size_bytes,
        layout: VolumeLayout::Block,
    }
}

fn not_found(id: &str) -> Refusal {
    refuse(
        RefusalKind::NotFound,
        format!("Resource {id} cannot be found."),
    )
}

fn visible(v: &InstanceView, scope: Option<&str>) -> bool {
    scope.is_none_or(|p| v.db.project == p)
}

/// §2.3: whether an action may start on the instance.
fn can_act(v: &InstanceView) -> Result<(), Refusal> {
    let msg = |what: &str, value: &str| {
        refuse(
            RefusalKind::Unprocessable,
            format!(
                "Instance {} is not currently available for an action to be performed ({what} status was {value}).",
                v.db.id
            ),
        )
    };
    if v.trove.task != TroveTask::None {
        return Err(msg("task", v.trove.task.name()));
    }
    if let Some(j) = &v.trove.busy_job {
        return Err(refuse(
            RefusalKind::Unprocessable,
            format!(
                "Instance {} is not currently available for an action to be performed (it is busy with job {j}).",
                v.db.id
            ),
        ));
    }
    if v.db.status != DatabaseStatus::Active {
        return Err(msg("instance", v.status()));
    }
    if !v.trove.service.allows_action() {
        return Err(msg("service", v.trove.service.api_name()));
    }
    Ok(())
}

/// Not busy with another job (actions that skip §2.3 still never overlap).
fn not_busy(v: &InstanceView) -> Result<(), Refusal> {
    match &v.trove.busy_job {
        Some(j) => Err(refuse(
            RefusalKind::Unprocessable,
            format!(
                "Instance {} is not currently available for an action to be performed (task status was {}, job {j}).",
                v.db.id,
                v.trove.task.name()
            ),
        )),
        None => Ok(()),
    }
}

fn all_hosts(txn: &Txn<'_>) -> Result<Vec<Host>, StoreError> {
    let mut out = Vec::new();
    for (_, v) in txn.scan_prefix(CF_HOSTS, b"")? {
        out.push(crate::codec::decode::<Host>(&v)?);
    }
    Ok(out)
}

/// Where a new volume of `bytes` for `flavor` can go: an online host (not in `exclude`,
/// in `site` if given) with room, preferring hosts outside `avoid_site`, then the most
/// free RAM, then the name. Deterministic: reads only the store.
fn place(
    txn: &Txn<'_>,
    flavor: &Flavor,
    bytes: u64,
    exclude: &BTreeSet<String>,
    site: Option<&str>,
    avoid_site: Option<&str>,
    holder: &str,
) -> Result<Option<(String, String)>, StoreError> {
    type Rank = (bool, std::cmp::Reverse<u64>, String);
    let mut best: Option<(Rank, String)> = None;
    for h in all_hosts(txn)? {
        if h.state != HostState::Online
            || exclude.contains(&h.name)
            || site.is_some_and(|s| h.site != s)
        {
            continue;
        }
        let Some(pool) = h.capacity.pools.iter().find_map(|p| {
            let req = ResourceAmount {
                vcpus: flavor.vcpus,
                ram_mb: flavor.ram_mb,
                pool_bytes: BTreeMap::from([(p.name.clone(), bytes)]),
            };
            match inventory::check_reserve(txn, &h.name, holder, &req) {
                Ok(Ok(_)) => Some(p.name.clone()),
                _ => None,
            }
        }) else {
            continue;
        };
        let rank = (
            avoid_site.is_some_and(|s| h.site == s),
            std::cmp::Reverse(h.available().ram_mb),
            h.name.clone(),
        );
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, pool));
        }
    }
    Ok(best.map(|((_, _, host), pool)| (host, pool)))
}

// ---------------------------------------------------------------------------------------
// Plans: everything a command stages, checked before anything is written
// ---------------------------------------------------------------------------------------

struct Plan {
    job: NewJob,
    /// Pairs to create (their tasks are in `job`).
    new_pairs: Vec<NewPair>,
    /// Operations begun on existing pairs (their tasks are in `job`).
    pair_ops: Vec<(String, PairOp)>,
    /// Instances the job holds: record to save (task and pending op set).
    members: Vec<TroveInstance>,
    /// Inventory records to write before the job (new instances, status changes).
    databases: Vec<DatabaseInstance>,
    /// Other Trove records to save (e.g. a source listing a new replica).
    others: Vec<TroveInstance>,
}

impl Plan {
    fn new(job_id: &str, job_type: &str, project: &str, subject: &str, action: &str) -> Self {
        Plan {
            job: NewJob {
                id: job_id.to_string(),
                job_type: job_type.to_string(),
                project: project.to_string(),
                entities: BTreeMap::from([
                    ("instance_id".to_string(), subject.to_string()),
                    ("action".to_string(), action.to_string()),
                ]),
                tasks: Vec::new(),
                sub_jobs: Vec::new(),
            },
            new_pairs: Vec::new(),
            pair_ops: Vec::new(),
            members: Vec::new(),
            databases: Vec::new(),
            others: Vec::new(),
        }
    }

    /// Adds a task after `after`; returns its id.
    fn task(&mut self, name: &str, kind: TaskKind, after: &[String]) -> String {
        let id = format!("{}:{name}", self.job.id);
        self.job.tasks.push(NewTask {
            id: id.clone(),
            kind,
            depends_on: after.to_vec(),
            max_attempts: TASK_ATTEMPTS,
            host: None,
        });
        id
    }

    fn workload(
        &mut self,
        name: &str,
        db: &DatabaseInstance,
        action: WorkloadAction,
        after: &[String],
    ) -> String {
        let kind = TaskKind::Workload {
            host: db.host.clone(),
            workload_kind: "database".into(),
            workload_id: db.id.clone(),
            action,
        };
        self.task(name, kind, after)
    }

    /// A pair operation planned into the job (checked in [`Plan::check`]).
    fn pair_op(&mut self, p: &Pair, op: PairOp, after: &[String]) -> Vec<String> {
        let last = replication::plan_op(p, &op, &mut self.job, after);
        self.pair_ops.push((p.id.clone(), op));
        last
    }

    /// A new pair `source → target` of an existing target volume: only a full sync (the
    /// target exists already; only changed blocks move).
    fn repoint(
        &mut self,
        pair_id: &str,
        project: &str,
        owner: &str,
        source: &DatabaseInstance,
        target: &DatabaseInstance,
        after: &[String],
    ) -> String {
        let np = new_pair(pair_id, project, owner, source, target);
        let kind = TaskKind::Sync {
            pair_id: np.id.clone(),
            source: np.source.clone(),
            target: np.target.clone(),
            bwlimit_bytes_per_sec: None,
            full: true,
        };
        self.new_pairs.push(np);
        self.task(&format!("{pair_id}:sync"), kind, after)
    }

    fn member(&mut self, v: &InstanceView, task: TroveTask, op: PendingOp) {
        let mut t = v.trove.clone();
        t.task = task;
        t.pending = Some(op);
        t.busy_job = Some(self.job.id.clone());
        self.members.push(t);
    }

    /// Checks everything the plan will write. Stages nothing.
    fn check(&self, txn: &Txn<'_>) -> Result<Result<(), CommandError>, StoreError> {
        // A job without tasks (e.g. deleting an instance whose host is gone) ends at once.
        if !self.job.tasks.is_empty() {
            if let Err(e) = jobs::validate_new_job(&self.job) {
                return Ok(Err(e));
            }
        }
        for np in &self.new_pairs {
            if let Err(e) = replication::check_new_pair(txn, np)? {
                return Ok(Err(e));
            }
        }
        for (id, op) in &self.pair_ops {
            let Some(p) = replication::load_pair(txn, id)? else {
                return Ok(Err(CommandError::NotFound {
                    kind: "replication pair".into(),
                    id: id.clone(),
                }));
            };
            if let Err(e) = replication::check_op(&p, op) {
                return Ok(Err(e));
            }
        }
        for db in &self.databases {
            let Some(h) = inventory::host_txn(txn, &db.host)? else {
                return Ok(Err(CommandError::NotFound {
                    kind: "host".into(),
                    id: db.host.clone(),
                }));
            };
            if h.pool(&db.volume.pool).is_none() {
                return Ok(Err(CommandError::NotFound {
                    kind: "storage pool".into(),
                    id: format!("{}/{}", db.host, db.volume.pool),
                }));
            }
        }
        jobs::check_new_job(txn, &self.job)
    }

    /// Writes the plan (after [`Plan::check`]).
    fn stage(
        self,
        txn: &mut Txn<'_>,
        now: u64,
    ) -> Result<Result<String, CommandError>, StoreError> {
        if !self.databases.is_empty() {
            if let Err(e) = inventory::put_databases(txn, &self.databases, now)? {
                return Ok(Err(e));
            }
        }
        for np in &self.new_pairs {
            replication::insert_pair(txn, np, &self.job.id, now)?;
        }
        for (id, op) in &self.pair_ops {
            if let Err(e) = replication::begin_op(txn, id, op, &self.job.id, now)? {
                return Ok(Err(e));
            }
        }
        for mut t in self.others {
            t.updated_at_ms = now;
            save_trove(txn, &t)?;
        }
        for mut t in self.members {
            t.updated_at_ms = now;
            txn.put(CF_TROVE_INDEX, &job_key(&self.job.id, &t.id), Vec::new())?;
            save_trove(txn, &t)?;
        }
        jobs::insert_job(txn, &self.job, None, now)?;
        jobs::finish_if_empty(txn, &self.job.id, now)?;
        Ok(Ok(self.job.id))
    }
}

fn new_pair(
    id: &str,
    project: &str,
    owner: &str,
    source: &DatabaseInstance,
    target: &DatabaseInstance,
) -> NewPair {
    NewPair {
        id: id.to_string(),
        project: project.to_string(),
        owner: owner.to_string(),
        source: volume_ref(source),
        target: volume_ref(target),
        enabled: true,
        sleep_time_s: REPLICA_SYNC_INTERVAL_S,
        bwlimit_bytes_per_sec: None,
    }
}

fn pair_id_for(job_id: &str, n: usize) -> String {
    format!("trove-{job_id}-{n}")
}

fn owner_of(set_source: &str) -> String {
    format!("trove/set/{set_source}")
}

type Checked<T> = Result<Result<T, Refusal>, StoreError>;

fn accepted(ids: Vec<String>, job_id: Option<String>) -> CommandResult {
    Ok(Outcome::Trove(Box::new(TroveOutcome::Accepted {
        ids,
        job_id,
    })))
}

fn refused(r: Refusal) -> CommandResult {
    Ok(Outcome::Trove(Box::new(TroveOutcome::Refused(r))))
}

/// Checks then stages a plan; a state-machine refusal of the plan (a pair busy, a host
/// gone) is Trove's 422.
fn run_plan(
    txn: &mut Txn<'_>,
    plan: Plan,
    ids: Vec<String>,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let refusal = |e: CommandError| match e {
        CommandError::Invalid { .. } => bad(e.to_string()),
        other => refuse(RefusalKind::Unprocessable, other.to_string()),
    };
    if let Err(e) = plan.check(txn)? {
        return Ok(refused(refusal(e)));
    }
    match plan.stage(txn, now)? {
        Ok(job) => Ok(accepted(ids, Some(job))),
        Err(e) => Ok(refused(refusal(e))),
    }
}

// ---------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------

pub(crate) fn apply(
    txn: &mut Txn<'_>,
    cmd: &TroveCommand,
    now: u64,
) -> Result<CommandResult, StoreError> {
    match cmd {
        TroveCommand::Create(c) => create(txn, c, now),
        TroveCommand::Act {
            id,
            scope,
            action,
            job_id,
        } => act(txn, id, scope.as_deref(), action, job_id, now),
        TroveCommand::Update {
            id,
            scope,
            name,
            access,
        } => {
            let Some(v) = load_view(txn, id)?.filter(|v| visible(v, scope.as_deref())) else {
                return Ok(refused(not_found(id)));
            };
            let mut t = v.trove.clone();
            if let Some(a) = access {
                t.access = a.clone();
            }
            t.updated_at_ms = now;
            if let Some(n) = name {
                if *n != v.db.name {
                    let mut db = v.db.clone();
                    db.name = n.clone();
                    if let Err(e) = inventory::put_databases(txn, &[db], now)? {
                        return Ok(refused(refuse(RefusalKind::Unprocessable, e.to_string())));
                    }
                }
            }
            save_trove(txn, &t)?;
            Ok(accepted(vec![id.clone()], None))
        }
    }
}

fn create(txn: &mut Txn<'_>, c: &CreateInstance, now: u64) -> Result<CommandResult, StoreError> {
    for id in &c.ids {
        if load_db(txn, id)?.is_some() || load_trove(txn, id)?.is_some() {
            return Ok(Err(CommandError::AlreadyExists {
                kind: "instance".into(),
                id: id.clone(),
            }));
        }
    }
    match &c.replica_of {
        Some(master) => create_replicas(txn, c, master, now),
        None => create_one(txn, c, now),
    }
}

fn new_trove(id: &str, c: &CreateInstance, flavor_id: &str, now: u64) -> TroveInstance {
    TroveInstance {
        id: id.to_string(),
        project: c.project.clone(),
        flavor_id: flavor_id.to_string(),
        task: TroveTask::Building,
        service: ServiceStatus::New,
        replica_of: None,
        replicas: Vec::new(),
        feed_pair: None,
        busy_job: None,
        pending: None,
        fault: None,
        access: c.access.clone().unwrap_or_default(),
        locality: c.locality.clone(),
        region: c.region.clone(),
        availability_zone: c.availability_zone.clone(),
        image_id: None,
        deleted_at_ms: None,
        deleted_record: None,
        created_at_ms: now,
        updated_at_ms: now,
        service_updated_ms: now,
    }
}

fn create_one(
    txn: &mut Txn<'_>,
    c: &CreateInstance,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let Some(fid) = &c.flavor_id else {
        return Ok(refused(bad(
            "Validation error: instance 'flavorRef' is a required property",
        )));
    };
    let Some(fl) = flavor(fid) else {
        return Ok(refused(bad(format!("Flavor {fid} could not be found."))));
    };
    let Some(gb) = c.volume_gb else {
        return Ok(refused(bad("Volume size was not specified.")));
    };
    if gb > MAX_VOLUME_GB {
        return Ok(refused(refuse(
            RefusalKind::OverLimit,
            format!("Volume size {gb} is greater than the maximum volume size {MAX_VOLUME_GB} GB."),
        )));
    }
    let flavor = Flavor {
        vcpus: fl.vcpus,
        ram_mb: fl.ram_mb,
    };
    let bytes = gb * GIB;
    let site = c.availability_zone.as_deref();
    if let Some(s) = site {
        if txn.get(crate::store::CF_SITES, s.as_bytes())?.is_none() {
            return Ok(refused(bad(format!(
                "Availability zone {s} does not exist."
            ))));
        }
    }
    let Some((host, pool)) = place(txn, &flavor, bytes, &BTreeSet::new(), site, None, &c.job_id)?
    else {
        return Ok(refused(bad(
            "No valid host was found: no online host has room for this flavor and volume.",
        )));
    };
    let id = &c.ids[0];
    let (kind, version) = match &c.datastore {
        Some(d) => (d.kind.clone(), d.version.clone()),
        None => (DEFAULT_DATASTORE.0.into(), DEFAULT_DATASTORE.1.into()),
    };
    let db = DatabaseInstance {
        id: id.clone(),
        project: c.project.clone(),
        name: c.name.clone(),
        host,
        status: DatabaseStatus::Build,
        volume: Volume {
            id: format!("{id}-data"),
            size_bytes: bytes,
            pool,
            path: String::new(),
        },
        flavor,
        datastore: Datastore { kind, version },
        created_at_ms: now,
        updated_at_ms: now,
    };
    let mut plan = Plan::new(&c.job_id, "troveCreate", &c.project, id, "create");
    let vol = plan.task(
        "create_volume",
        TaskKind::Workload {
            host: db.host.clone(),
            workload_kind: VOLUME_KIND.into(),
            workload_id: db.id.clone(),
            action: WorkloadAction::CreateVolume {
                volume: volume_ref(&db),
            },
        },
        &[],
    );
    plan.workload("start", &db, WorkloadAction::Start, &[vol]);
    let t = new_trove(id, c, fid, now);
    plan.member(
        &InstanceView {
            db: db.clone(),
            trove: t,
        },
        TroveTask::Building,
        PendingOp::Create,
    );
    plan.databases.push(db);
    run_plan(txn, plan, c.ids.clone(), now)
}

fn create_replicas(
    txn: &mut Txn<'_>,
    c: &CreateInstance,
    master_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    if c.flavor_id.is_some() {
        return Ok(refused(bad(
            "Cannot specify flavor when creating replicas.",
        )));
    }
    if c.volume_gb.is_some() {
        return Ok(refused(bad(
            "Cannot specify volume when creating replicas.",
        )));
    }
    if c.datastore.is_some() {
        return Ok(refused(bad(
            "Cannot specify datastore when creating replicas.",
        )));
    }
    let Some(master) = load_view(txn, master_id)?.filter(|v| v.db.project == c.project) else {
        return Ok(refused(not_found(master_id)));
    };
    if master.trove.replica_of.is_some() {
        return Ok(refused(refuse(
            RefusalKind::Unauthorized,
            format!("Cannot create a replica of a replica {master_id}."),
        )));
    }
    if let Err(r) = can_act(&master) {
        return Ok(refused(r));
    }
    // Every member of the set is on its own host.
    let mut exclude: BTreeSet<String> = BTreeSet::from([master.db.host.clone()]);
    for r in &master.trove.replicas {
        if let Some(db) = load_db(txn, r)? {
            exclude.insert(db.host.clone());
        }
    }
    let master_site = inventory::host_txn(txn, &master.db.host)?.map(|h| h.site);
    let mut plan = Plan::new(
        &c.job_id,
        "troveCreateReplica",
        &c.project,
        master_id,
        "create_replica",
    );
    let mut source = master.trove.clone();
    for (n, id) in c.ids.iter().enumerate() {
        let Some((host, pool)) = place(
            txn,
            &master.db.flavor,
            master.db.volume.size_bytes,
            &exclude,
            c.availability_zone.as_deref(),
            master_site.as_deref(),
            &c.job_id,
        )?
        else {
            return Ok(refused(bad(format!(
                "No valid host was found for replica {} of {}: every replica needs its own online host with room.",
                n + 1,
                c.ids.len()
            ))));
        };
        exclude.insert(host.clone());
        let db = DatabaseInstance {
            id: id.clone(),
            project: c.project.clone(),
            name: if c.ids.len() == 1 {
                c.name.clone()
            } else {
                format!("{}-{}", c.name, n + 1)
            },
            host,
            status: DatabaseStatus::Build,
            volume: Volume {
                id: format!("{id}-data"),
                size_bytes: master.db.volume.size_bytes,
                pool,
                path: String::new(),
            },
            flavor: master.db.flavor,
            datastore: master.db.datastore.clone(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let pid = pair_id_for(&c.job_id, n);
        let np = new_pair(&pid, &c.project, &owner_of(master_id), &master.db, &db);
        let staged_like = pair_from_new(&np, &c.job_id, now);
        replication::plan_op(&staged_like, &PairOp::Create, &mut plan.job, &[]);
        plan.new_pairs.push(np);
        let mut t = new_trove(id, c, &master.trove.flavor_id, now);
        t.replica_of = Some(master_id.to_string());
        t.feed_pair = Some(pid);
        plan.member(
            &InstanceView {
                db: db.clone(),
                trove: t,
            },
            TroveTask::Building,
            PendingOp::CreateReplica,
        );
        plan.databases.push(db);
        source.replicas.push(id.clone());
    }
    plan.others.push(source);
    run_plan(txn, plan, c.ids.clone(), now)
}

/// The pair `insert_pair` will stage, for planning its tasks before it exists.
fn pair_from_new(np: &NewPair, job_id: &str, now: u64) -> Pair {
    Pair {
        id: np.id.clone(),
        project: np.project.clone(),
        owner: np.owner.clone(),
        source: np.source.clone(),
        target: np.target.clone(),
        state: replication::PairState::Creating,
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

/// The members of the replication set whose source is `source` (source first).
fn set_of(txn: &Txn<'_>, source: &InstanceView) -> Result<Vec<InstanceView>, StoreError> {
    let mut out = vec![source.clone()];
    for r in &source.trove.replicas {
        if let Some(v) = load_view(txn, r)? {
            out.push(v);
        }
    }
    Ok(out)
}

fn feed_pair(txn: &Txn<'_>, v: &InstanceView) -> Checked<Pair> {
    let Some(pid) = &v.trove.feed_pair else {
        return Ok(Err(refuse(
            RefusalKind::Unprocessable,
            format!(
                "Instance {} has no replication link to its source.",
                v.db.id
            ),
        )));
    };
    match replication::load_pair(txn, pid)? {
        Some(p) => Ok(Ok(p)),
        None => Ok(Err(refuse(
            RefusalKind::Unprocessable,
            format!(
                "The replication link {pid} of instance {} is gone; detach the instance.",
                v.db.id
            ),
        ))),
    }
}

macro_rules! tri {
    ($e:expr) => {
        match $e? {
            Ok(v) => v,
            Err(r) => return Ok(refused(r)),
        }
    };
}

fn act(
    txn: &mut Txn<'_>,
    id: &str,
    scope: Option<&str>,
    action: &TroveAction,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let Some(v) = load_view(txn, id)?.filter(|v| visible(v, scope)) else {
        return Ok(refused(not_found(id)));
    };
    let project = v.db.project.clone();
    let mut plan = Plan::new(job_id, action.job_type(), &project, id, action.name());
    match action {
        TroveAction::Restart | TroveAction::Upgrade { .. } => {
            if let Err(r) = can_act(&v) {
                return Ok(refused(r));
            }
            let (task, op) = match action {
                TroveAction::Upgrade { version } => {
                    if *version == v.db.datastore.version {
                        return Ok(refused(bad(format!(
                            "The instance already runs datastore version {version}."
                        ))));
                    }
                    (
                        TroveTask::Upgrading,
                        PendingOp::Upgrade {
                            version: version.clone(),
                        },
                    )
                }
                _ => (TroveTask::Rebooting, PendingOp::Restart),
            };
            plan.workload("restart", &v.db, WorkloadAction::Restart, &[]);
            plan.member(&v, task, op);
            if let Some(m) = plan.members.last_mut() {
                m.service = ServiceStatus::Restarting;
            }
        }
        TroveAction::ResizeFlavor { flavor_id } => {
            if let Err(r) = can_act(&v) {
                return Ok(refused(r));
            }
            let Some(fl) = flavor(flavor_id) else {
                return Ok(refused(bad(format!(
                    "Flavor {flavor_id} could not be found."
                ))));
            };
            if fl.id == v.trove.flavor_id {
                return Ok(refused(bad(format!(
                    "The new flavor id must be different than the current flavor id of '{}'.",
                    v.trove.flavor_id
                ))));
            }
            // The host must have room for the growth (the old flavor is counted already).
            let grow = ResourceAmount {
                vcpus: fl.vcpus.saturating_sub(v.db.flavor.vcpus),
                ram_mb: fl.ram_mb.saturating_sub(v.db.flavor.ram_mb),
                pool_bytes: BTreeMap::new(),
            };
            if let Err(e) = inventory::check_reserve(txn, &v.db.host, job_id, &grow)? {
                return Ok(refused(refuse(RefusalKind::OverLimit, e.to_string())));
            }
            plan.workload("restart", &v.db, WorkloadAction::Restart, &[]);
            plan.member(
                &v,
                TroveTask::Resizing,
                PendingOp::ResizeFlavor {
                    flavor_id: flavor_id.clone(),
                },
            );
        }
        TroveAction::ResizeVolume { size_gb } => {
            let current = v.volume_gb();
            if *size_gb <= current {
                return Ok(refused(bad(format!(
                    "The new volume 'size' must be greater than the current volume size of '{current}'."
                ))));
            }
            if *size_gb > MAX_VOLUME_GB {
                return Ok(refused(refuse(
                    RefusalKind::OverLimit,
                    format!(
                        "Volume size {size_gb} is greater than the maximum volume size {MAX_VOLUME_GB} GB."
                    ),
                )));
            }
            let bytes = size_gb * GIB;
            let members = if v.trove.replica_of.is_none() {
                set_of(txn, &v)?
            } else {
                vec![v.clone()]
            };
            for m in &members {
                if let Err(r) = can_act(m) {
                    return Ok(refused(r));
                }
            }
            let resized = plan.workload(
                &format!("resize:{}", v.db.id),
                &v.db,
                WorkloadAction::ResizeVolume {
                    volume: volume_ref(&v.db),
                    size_bytes: bytes,
                },
                &[],
            );
            for m in &members[1..] {
                let r = plan.workload(
                    &format!("resize:{}", m.db.id),
                    &m.db,
                    WorkloadAction::ResizeVolume {
                        volume: volume_ref(&m.db),
                        size_bytes: bytes,
                    },
                    &[],
                );
                // The replica follows the grown source with a sync.
                let p = tri!(feed_pair(txn, m));
                plan.pair_op(
                    &p,
                    PairOp::Sync {
                        full: false,
                        periodic: false,
                    },
                    &[resized.clone(), r],
                );
            }
            for m in &members {
                plan.member(
                    m,
                    TroveTask::Resizing,
                    PendingOp::ResizeVolume { size_bytes: bytes },
                );
            }
        }
        TroveAction::Promote => return promote(txn, v, plan, now),
        TroveAction::Eject => return eject(txn, v, plan, now),
        TroveAction::ResetStatus | TroveAction::ResetTask => {
            // The operator's escape hatch: the instance leaves its job (which is cancelled
            // if it still runs) and its task.
            if let Some(j) = v.trove.busy_job.clone() {
                let mut t = v.trove.clone();
                t.busy_job = None;
                let abandoned_build = matches!(
                    t.pending.take(),
                    Some(PendingOp::Create | PendingOp::CreateReplica)
                );
                if abandoned_build {
                    // The build will not finish: the server is in error.
                    let mut db = v.db.clone();
                    db.status = DatabaseStatus::Error;
                    inventory::put_databases(txn, &[db], now)?.ok();
                    t.fault = Some(Fault {
                        message: format!("The build was abandoned by {}.", action.name()),
                        details: Some(format!("job {j}")),
                        created_ms: now,
                    });
                }
                save_trove(txn, &t)?;
                txn.delete(CF_TROVE_INDEX, &job_key(&j, id))?;
                if jobs::load_job_txn(txn, &j)?.is_some_and(|job| !job.status.is_terminal()) {
                    jobs::cancel_job(
                        txn,
                        &j,
                        &format!("cancelled by {} of instance {id}", action.name()),
                        now,
                    )?;
                }
            }
            let Some(v) = load_view(txn, id)? else {
                return Ok(refused(not_found(id)));
            };
            let mut t = v.trove.clone();
            t.task = TroveTask::None;
            if *action == TroveAction::ResetStatus {
                t.service = ServiceStatus::Unknown;
                t.service_updated_ms = now;
            }
            t.updated_at_ms = now;
            save_trove(txn, &t)?;
            return Ok(accepted(vec![id.to_string()], None));
        }
        TroveAction::Stop => {
            tri!(Ok::<_, StoreError>(not_busy(&v)));
            plan.workload("stop", &v.db, WorkloadAction::Stop, &[]);
            plan.member(&v, TroveTask::None, PendingOp::Stop);
        }
        TroveAction::Reboot | TroveAction::Rebuild { .. } => {
            tri!(Ok::<_, StoreError>(not_busy(&v)));
            let stop = plan.workload("stop", &v.db, WorkloadAction::Stop, &[]);
            plan.workload("start", &v.db, WorkloadAction::Start, &[stop]);
            match action {
                TroveAction::Rebuild { image_id } => plan.member(
                    &v,
                    TroveTask::Building,
                    PendingOp::Rebuild {
                        image_id: image_id.clone(),
                    },
                ),
                _ => plan.member(&v, TroveTask::Rebooting, PendingOp::Reboot),
            }
            if let Some(m) = plan.members.last_mut() {
                m.service = ServiceStatus::Restarting;
            }
        }
        TroveAction::Migrate { host } => {
            if let Err(r) = can_act(&v) {
                return Ok(refused(r));
            }
            if v.trove.replica_of.is_some() || !v.trove.replicas.is_empty() {
                return Ok(refused(bad(format!(
                    "Instance {id} is a member of a replication set: detach its replicas (or detach it) before migrating it."
                ))));
            }
            let (dst, pool) = match host {
                Some(h) => {
                    if *h == v.db.host {
                        return Ok(refused(bad(format!(
                            "Instance {id} is already on host {h}."
                        ))));
                    }
                    let Some(hr) = inventory::host_txn(txn, h)? else {
                        return Ok(refused(bad(format!("Host {h} could not be found."))));
                    };
                    if !hr.is_online() {
                        return Ok(refused(bad(format!("Host {h} is not online."))));
                    }
                    let mut found = None;
                    for p in &hr.capacity.pools {
                        let req = ResourceAmount {
                            vcpus: v.db.flavor.vcpus,
                            ram_mb: v.db.flavor.ram_mb,
                            pool_bytes: BTreeMap::from([(p.name.clone(), v.db.volume.size_bytes)]),
                        };
                        if inventory::check_reserve(txn, h, job_id, &req)?.is_ok() {
                            found = Some(p.name.clone());
                            break;
                        }
                    }
                    let Some(pool) = found else {
                        return Ok(refused(bad(format!(
                            "Host {h} has no room for instance {id}."
                        ))));
                    };
                    (h.clone(), pool)
                }
                None => {
                    let exclude = BTreeSet::from([v.db.host.clone()]);
                    match place(
                        txn,
                        &v.db.flavor,
                        v.db.volume.size_bytes,
                        &exclude,
                        None,
                        None,
                        job_id,
                    )? {
                        Some(x) => x,
                        None => {
                            return Ok(refused(bad(
                                "No valid host was found: no other online host has room for the instance.",
                            )))
                        }
                    }
                }
            };
            // Room for the duration of the move.
            let stop = plan.workload("stop", &v.db, WorkloadAction::Stop, &[]);
            let mut moved = v.db.clone();
            moved.host = dst.clone();
            moved.volume.pool = pool.clone();
            moved.volume.path = String::new();
            let mig = plan.task(
                "migrate",
                TaskKind::Migrate {
                    server_id: id.to_string(),
                    source_host: v.db.host.clone(),
                    target_host: dst.clone(),
                    disks: vec![MigrateDisk {
                        source: volume_ref(&v.db),
                        target: volume_ref(&moved),
                    }],
                },
                &[stop],
            );
            let del = plan.workload(
                "delete_old_volume",
                &v.db,
                WorkloadAction::DeleteVolume {
                    volume: volume_ref(&v.db),
                },
                &[mig],
            );
            plan.workload("start", &moved, WorkloadAction::Start, &[del]);
            plan.member(
                &v,
                TroveTask::Migrating,
                PendingOp::Migrate { host: dst, pool },
            );
        }
        TroveAction::Detach => {
            if v.trove.replica_of.is_none() {
                return Ok(refused(bad(format!("Instance {id} is not a replica."))));
            }
            if let Err(r) = can_act(&v) {
                return Ok(refused(r));
            }
            let p = tri!(feed_pair(txn, &v));
            let promote = plan.task(
                "promote",
                TaskKind::Promote {
                    pair_id: p.id.clone(),
                    volume: volume_ref(&v.db),
                },
                &[],
            );
            plan.pair_op(
                &p,
                PairOp::Delete {
                    delete_target: false,
                },
                &[promote],
            );
            plan.member(&v, TroveTask::Detaching, PendingOp::Detach);
        }
        TroveAction::Delete => {
            if v.trove.task == TroveTask::Building && v.trove.busy_job.is_some() {
                return Ok(refused(refuse(
                    RefusalKind::Unprocessable,
                    format!(
                        "Instance {id} is not currently available for an action to be performed (task status was BUILDING)."
                    ),
                )));
            }
            if !v.trove.replicas.is_empty() {
                return Ok(refused(refuse(
                    RefusalKind::Forbidden,
                    "Detach replicas before deleting replica source.",
                )));
            }
            tri!(Ok::<_, StoreError>(not_busy(&v)));
            let online = inventory::host_txn(txn, &v.db.host)?.is_some_and(|h| h.is_online());
            // A host that is gone cannot delete anything: the record goes, its data stays.
            let mut after = Vec::new();
            if online {
                after.push(plan.workload("stop", &v.db, WorkloadAction::Stop, &[]));
            }
            let feed = match &v.trove.feed_pair {
                Some(pid) => replication::load_pair(txn, pid)?,
                None => None,
            };
            match feed {
                Some(p) if p.target.volume_id == v.db.volume.id && p.target.host == v.db.host => {
                    plan.pair_op(
                        &p,
                        PairOp::Delete {
                            delete_target: online,
                        },
                        &after,
                    );
                }
                _ => {
                    if online {
                        plan.workload(
                            "delete_volume",
                            &v.db,
                            WorkloadAction::DeleteVolume {
                                volume: volume_ref(&v.db),
                            },
                            &after,
                        );
                    }
                }
            }
            plan.member(&v, TroveTask::Deleting, PendingOp::Delete);
        }
    }
    run_plan(txn, plan, vec![id.to_string()], now)
}

/// TROVE-ACT-PROMOTE: `v` (a replica) becomes the source of its set.
fn promote(
    txn: &mut Txn<'_>,
    v: InstanceView,
    mut plan: Plan,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let id = v.db.id.clone();
    let Some(master_id) = v.trove.replica_of.clone() else {
        return Ok(refused(bad(format!("Instance {id} is not a replica."))));
    };
    if let Err(r) = can_act(&v) {
        return Ok(refused(r));
    }
    let Some(master) = load_view(txn, &master_id)? else {
        return Ok(refused(refuse(
            RefusalKind::Unprocessable,
            format!("The replica source {master_id} of instance {id} is gone."),
        )));
    };
    let set = set_of(txn, &master)?;
    for m in &set {
        tri!(Ok::<_, StoreError>(not_busy(m)));
    }
    let p_r = tri!(feed_pair(txn, &v));
    // Final sync, fence the old source, promote the replica; the pair keeps replicating
    // from the new source to the old one.
    let promoted = plan.pair_op(
        &p_r,
        PairOp::PlannedFailover {
            keep_replicating: true,
        },
        &[],
    );
    let mut pairs = BTreeMap::from([(master_id.clone(), p_r.id.clone())]);
    let project = v.db.project.clone();
    for (n, x) in set.iter().skip(1).filter(|x| x.db.id != id).enumerate() {
        let p_x = tri!(feed_pair(txn, x));
        plan.pair_op(
            &p_x,
            PairOp::Delete {
                delete_target: false,
            },
            &promoted,
        );
        let pid = pair_id_for(&plan.job.id, n);
        plan.repoint(&pid, &project, &owner_of(&id), &v.db, &x.db, &promoted);
        pairs.insert(x.db.id.clone(), pid);
    }
    let op = PendingOp::Promote {
        new_source: id.clone(),
        old_source: master_id,
        pairs,
    };
    for m in &set {
        plan.member(m, TroveTask::Promoting, op.clone());
    }
    run_plan(txn, plan, vec![id], now)
}

/// TROVE-ACT-EJECT: `v` (an unreachable source) leaves its set; the replica with the most
/// recent data becomes the source.
fn eject(
    txn: &mut Txn<'_>,
    v: InstanceView,
    mut plan: Plan,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let id = v.db.id.clone();
    if v.trove.replicas.is_empty() {
        return Ok(refused(bad(format!(
            "Instance {id} is not a replica source."
        ))));
    }
    if let Some(h) = inventory::host_txn(txn, &v.db.host)? {
        let beat = h.last_heartbeat_ms.unwrap_or(0);
        if h.is_online() && now.saturating_sub(beat) < HEARTBEAT_EXPIRY_MS {
            return Ok(refused(bad(format!(
                "Replica Source {id} cannot be ejected as it has a current heartbeat"
            ))));
        }
    }
    let set = set_of(txn, &v)?;
    for m in &set {
        tri!(Ok::<_, StoreError>(not_busy(m)));
    }
    // Elect: the replica whose pair holds the most recent data, among those that can be
    // promoted from their last synced point (ties: the lowest id).
    let mut best: Option<(u64, std::cmp::Reverse<String>, Pair, InstanceView)> = None;
    for r in set.iter().skip(1) {
        let Ok(p) = feed_pair(txn, r)? else { continue };
        if replication::check_op(&p, &PairOp::UnplannedFailover).is_err()
            || p.recovery_point_ms.is_none()
        {
            continue;
        }
        let key = (
            p.recovery_point_ms.unwrap_or(0),
            std::cmp::Reverse(r.db.id.clone()),
        );
        if best
            .as_ref()
            .is_none_or(|(rp, rid, _, _)| key > (*rp, rid.clone()))
        {
            best = Some((key.0, key.1, p, r.clone()));
        }
    }
    let Some((_, _, p_b, b)) = best else {
        return Ok(refused(refuse(
            RefusalKind::Unprocessable,
            format!("No replica of {id} can be promoted: none has completed a sync."),
        )));
    };
    let promoted = plan.pair_op(&p_b, PairOp::UnplannedFailover, &[]);
    let mut pairs = BTreeMap::from([(id.clone(), p_b.id.clone())]);
    let project = v.db.project.clone();
    for (n, x) in set
        .iter()
        .skip(1)
        .filter(|x| x.db.id != b.db.id)
        .enumerate()
    {
        let p_x = tri!(feed_pair(txn, x));
        plan.pair_op(
            &p_x,
            PairOp::Delete {
                delete_target: false,
            },
            &promoted,
        );
        let pid = pair_id_for(&plan.job.id, n);
        plan.repoint(&pid, &project, &owner_of(&b.db.id), &b.db, &x.db, &promoted);
        pairs.insert(x.db.id.clone(), pid);
    }
    let op = PendingOp::Eject {
        new_source: b.db.id.clone(),
        old_source: id.clone(),
        pairs,
    };
    for m in &set {
        plan.member(m, TroveTask::Ejecting, op.clone());
    }
    if let Some(j) = plan.job.entities.get_mut("action") {
        j.push_str(&format!(" (elected {})", b.db.id));
    }
    run_plan(txn, plan, vec![id, b.db.id], now)
}

// ---------------------------------------------------------------------------------------
// The end of a job
// ---------------------------------------------------------------------------------------

/// Called whenever a job ends (SUCCESS or FAIL), after the pairs it held moved on: settles
/// every instance the job held.
pub(crate) fn on_job_end(txn: &mut Txn<'_>, job: &Job, now: u64) -> Result<(), StoreError> {
    let prefix = job_key(&job.id, "");
    let keys = txn.scan_prefix(CF_TROVE_INDEX, &prefix)?;
    if keys.is_empty() {
        return Ok(());
    }
    let mut members = Vec::new();
    for (key, _) in keys {
        txn.delete(CF_TROVE_INDEX, &key)?;
        let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        if let Some(t) = load_trove(txn, &id)? {
            if t.busy_job.as_deref() == Some(job.id.as_str()) {
                members.push(t);
            }
        }
    }
    let ok = job.status == JobStatus::Success;
    let reason = job
        .fail_reason
        .clone()
        .unwrap_or_else(|| "the job failed".to_string());
    let fault = |now: u64| Fault {
        message: reason.clone(),
        details: Some(format!("job {}", job.id)),
        created_ms: now,
    };
    // Membership changes of promote/eject, decided once from the pairs' end state.
    if let Some(op @ (PendingOp::Promote { .. } | PendingOp::Eject { .. })) =
        members.first().and_then(|t| t.pending.clone())
    {
        return settle_switch(txn, members, &op, ok, fault(now), now);
    }
    for mut t in members {
        let op = t.pending.take();
        t.busy_job = None;
        t.updated_at_ms = now;
        t.service_updated_ms = now;
        let Some(mut db) = load_db(txn, &t.id)? else {
            save_trove(txn, &t)?;
            continue;
        };
        if ok {
            t.task = TroveTask::None;
            t.fault = None;
            t.service = ServiceStatus::Healthy;
            db.status = DatabaseStatus::Active;
            match op {
                Some(PendingOp::Delete) => {
                    remove_from_source(txn, &t, now)?;
                    inventory::delete_database(txn, &t.id)?.ok();
                    t.deleted_at_ms = Some(now);
                    db.updated_at_ms = now;
                    t.deleted_record = Some(db);
                    t.feed_pair = None;
                    t.replica_of = None;
                    save_trove(txn, &t)?;
                    continue;
                }
                Some(PendingOp::Stop) => t.service = ServiceStatus::Shutdown,
                Some(PendingOp::ResizeFlavor { flavor_id }) => {
                    if let Some(f) = flavor(&flavor_id) {
                        db.flavor = Flavor {
                            vcpus: f.vcpus,
                            ram_mb: f.ram_mb,
                        };
                        t.flavor_id = flavor_id;
                    }
                }
                Some(PendingOp::ResizeVolume { size_bytes }) => {
                    db.volume.size_bytes = db.volume.size_bytes.max(size_bytes);
                }
                Some(PendingOp::Migrate { host, pool }) => {
                    db.host = host;
                    db.volume.pool = pool;
                    db.volume.path = String::new();
                }
                Some(PendingOp::Rebuild { image_id }) => t.image_id = Some(image_id),
                Some(PendingOp::Upgrade { version }) => db.datastore.version = version,
                Some(PendingOp::Detach) => {
                    remove_from_source(txn, &t, now)?;
                    t.replica_of = None;
                    t.feed_pair = None;
                }
                _ => {}
            }
        } else {
            t.fault = Some(fault(now));
            match op {
                Some(PendingOp::Create | PendingOp::CreateReplica) => {
                    t.task = TroveTask::BuildingError;
                    t.service = ServiceStatus::Failed;
                    db.status = DatabaseStatus::Error;
                }
                _ => {
                    t.task = TroveTask::None;
                    t.service = ServiceStatus::Failed;
                    db.status = DatabaseStatus::Error;
                }
            }
        }
        if inventory::host_txn(txn, &db.host)?.is_some_and(|h| h.pool(&db.volume.pool).is_some()) {
            inventory::put_databases(txn, &[db], now)?.ok();
        }
        save_trove(txn, &t)?;
    }
    Ok(())
}

/// Removes a replica from its source's `replicas`.
fn remove_from_source(txn: &mut Txn<'_>, t: &TroveInstance, now: u64) -> Result<(), StoreError> {
    let Some(src) = &t.replica_of else {
        return Ok(());
    };
    if let Some(mut s) = load_trove(txn, src)? {
        s.replicas.retain(|r| r != &t.id);
        s.updated_at_ms = now;
        save_trove(txn, &s)?;
    }
    Ok(())
}

/// Settles a promote or an eject: the new membership takes effect if the chosen replica
/// really became the writable copy (its pair was switched), whatever else failed.
fn settle_switch(
    txn: &mut Txn<'_>,
    members: Vec<TroveInstance>,
    op: &PendingOp,
    ok: bool,
    fault: Fault,
    now: u64,
) -> Result<(), StoreError> {
    let (new_source, old_source, pairs, eject) = match op {
        PendingOp::Promote {
            new_source,
            old_source,
            pairs,
        } => (new_source, old_source, pairs, false),
        PendingOp::Eject {
            new_source,
            old_source,
            pairs,
        } => (new_source, old_source, pairs, true),
        _ => return Ok(()),
    };
    // The new source's own feed pair tells whether the switch happened.
    let switched = match load_trove(txn, new_source)?.and_then(|t| t.feed_pair) {
        Some(pid) => match (
            replication::load_pair(txn, &pid)?,
            load_db(txn, new_source)?,
        ) {
            (Some(p), Some(db)) => p.source.volume_id == db.volume.id && p.source.host == db.host,
            _ => false,
        },
        None => false,
    };
    let ids: Vec<String> = members.iter().map(|t| t.id.clone()).collect();
    let others: Vec<String> = ids
        .iter()
        .filter(|i| *i != new_source && *i != old_source)
        .cloned()
        .collect();
    let new_feed = load_trove(txn, new_source)?.and_then(|t| t.feed_pair);
    for mut t in members {
        t.pending = None;
        t.busy_job = None;
        t.updated_at_ms = now;
        t.service_updated_ms = now;
        if switched {
            if t.id == *new_source {
                t.replica_of = None;
                t.feed_pair = None;
                t.replicas = if eject {
                    others.clone()
                } else {
                    std::iter::once(old_source.clone())
                        .chain(others.iter().cloned())
                        .collect()
                };
            } else if t.id == *old_source {
                t.replicas = Vec::new();
                // The pair that fed the new source now points at the old one.
                t.feed_pair = new_feed.clone();
                t.replica_of = if eject {
                    None
                } else {
                    Some(new_source.clone())
                };
            } else {
                t.replica_of = Some(new_source.clone());
                if let Some(p) = pairs.get(&t.id) {
                    if replication::load_pair(txn, p)?.is_some() {
                        t.feed_pair = Some(p.clone());
                    }
                }
            }
        }
        let mut db = load_db(txn, &t.id)?;
        if ok {
            t.task = TroveTask::None;
            t.fault = None;
            t.service = ServiceStatus::Healthy;
            if let Some(d) = db.as_mut() {
                d.status = DatabaseStatus::Active;
            }
        } else {
            t.task = if eject {
                TroveTask::EjectionError
            } else {
                TroveTask::PromotionError
            };
            t.fault = Some(fault.clone());
        }
        if eject && t.id == *old_source && switched {
            // The ejected source's host stopped answering: it leaves the set as it is.
            t.task = TroveTask::None;
            t.service = ServiceStatus::Unknown;
            t.fault = Some(Fault {
                message: format!(
                    "Ejected from its replication set; {new_source} is the replica source now."
                ),
                details: None,
                created_ms: now,
            });
            if let Some(d) = db.as_mut() {
                d.status = DatabaseStatus::Error;
            }
        }
        if let Some(d) = db {
            inventory::put_databases(txn, &[d], now)?.ok();
        }
        save_trove(txn, &t)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

impl Store {
    fn trove_record(&self, id: &str) -> Result<Option<TroveInstance>, StoreError> {
        self.get_record(CF_TROVE, &inst_key(id))
    }

    /// A live instance with its Trove state.
    pub fn trove_instance(&self, id: &str) -> Result<Option<InstanceView>, StoreError> {
        let Some(db) = self.get_database(id)? else {
            return Ok(None);
        };
        let trove = match self.trove_record(id)? {
            Some(t) if t.deleted_at_ms.is_none() => t,
            _ => TroveInstance::derived(&db),
        };
        Ok(Some(InstanceView { db, trove }))
    }

    /// A deleted instance (its last record), for the admin views.
    pub fn trove_deleted_instance(&self, id: &str) -> Result<Option<InstanceView>, StoreError> {
        Ok(self.trove_record(id)?.and_then(|t| {
            let db = t.deleted_record.clone()?;
            t.deleted_at_ms?;
            Some(InstanceView { db, trove: t })
        }))
    }

    /// Live instances of `project` (all projects if None), by id.
    pub fn trove_instances(&self, project: Option<&str>) -> Result<Vec<InstanceView>, StoreError> {
        let filter = inventory::WorkloadFilter {
            project: project.map(str::to_string),
            host: None,
        };
        let mut out = Vec::new();
        for db in self.list_databases(&filter)? {
            let trove = match self.trove_record(&db.id)? {
                Some(t) if t.deleted_at_ms.is_none() => t,
                _ => TroveInstance::derived(&db),
            };
            out.push(InstanceView { db, trove });
        }
        Ok(out)
    }

    /// Deleted instances of `project` (all if None), by id.
    pub fn trove_deleted_instances(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<InstanceView>, StoreError> {
        let mut out = Vec::new();
        for (_, t) in self.scan_prefix::<TroveInstance>(CF_TROVE, b"i/")? {
            if t.deleted_at_ms.is_none() || project.is_some_and(|p| t.project != p) {
                continue;
            }
            if let Some(db) = t.deleted_record.clone() {
                out.push(InstanceView { db, trove: t });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::command::Command;
    use crate::inventory::InventoryCommand;
    use crate::jobs::testkit::Fixture;
    use crate::jobs::{JobsCommand, TaskOutcome, TaskStatus};
    use crate::replication::{PairState, ReplicationCommand};

    const P: &str = "proj1";

    fn fixture(hosts: &[(&str, &str)]) -> Fixture {
        let fx = Fixture::new();
        let mut sites = BTreeSet::new();
        for (_, s) in hosts {
            if sites.insert(*s) {
                fx.site(s);
            }
        }
        for (h, s) in hosts {
            fx.host(h, s);
        }
        fx
    }

    fn trove(fx: &Fixture, c: TroveCommand) -> TroveOutcome {
        match fx.apply(Command::Trove(c)) {
            Ok(Outcome::Trove(o)) => *o,
            other => panic!("trove command: {other:?}"),
        }
    }

    fn accepted_job(o: TroveOutcome) -> String {
        match o {
            TroveOutcome::Accepted {
                job_id: Some(j), ..
            } => j,
            other => panic!("expected an accepted job, got {other:?}"),
        }
    }

    fn refusal(o: TroveOutcome) -> RefusalKind {
        match o {
            TroveOutcome::Refused(r) => r.kind,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn create(fx: &Fixture, id: &str, job: &str) -> String {
        accepted_job(trove(
            fx,
            TroveCommand::Create(Box::new(CreateInstance {
                project: P.into(),
                ids: vec![id.into()],
                name: format!("db-{id}"),
                flavor_id: Some("2".into()),
                volume_gb: Some(1),
                datastore: None,
                replica_of: None,
                availability_zone: None,
                locality: None,
                region: None,
                access: None,
                job_id: job.into(),
            })),
        ))
    }

    fn create_replicas(fx: &Fixture, master: &str, ids: &[&str], job: &str) -> TroveOutcome {
        trove(
            fx,
            TroveCommand::Create(Box::new(CreateInstance {
                project: P.into(),
                ids: ids.iter().map(|s| s.to_string()).collect(),
                name: "replica".into(),
                flavor_id: None,
                volume_gb: None,
                datastore: None,
                replica_of: Some(master.into()),
                availability_zone: None,
                locality: None,
                region: None,
                access: None,
                job_id: job.into(),
            })),
        )
    }

    fn act(fx: &Fixture, id: &str, action: TroveAction, job: &str) -> TroveOutcome {
        trove(
            fx,
            TroveCommand::Act {
                id: id.into(),
                scope: Some(P.into()),
                action,
                job_id: job.into(),
            },
        )
    }

    /// Runs every task of the job on its host until the job ends; `fail` names a task
    /// kind to fail for good.
    fn run(fx: &Fixture, job: &str, fail: Option<&str>) -> JobStatus {
        for _ in 0..100 {
            let j = fx.job(job);
            if j.status.is_terminal() {
                return j.status;
            }
            let ready: Vec<_> = fx
                .store
                .job_tasks(job)
                .expect("tasks")
                .into_iter()
                .filter(|t| t.status == TaskStatus::Ready)
                .collect();
            assert!(!ready.is_empty(), "job {job} is stuck: {j:?}");
            for t in ready {
                let host = t.placement_host.clone().expect("placement");
                let token = fx.assign_ok(&t.id, &host, 1);
                if fail == Some(t.kind.name()) {
                    let r = fx.jobs(JobsCommand::ReportResult {
                        task_id: t.id.clone(),
                        token,
                        outcome: TaskOutcome::Failed {
                            reason: "injected".into(),
                            retryable: false,
                        },
                    });
                    assert!(r.is_ok(), "{r:?}");
                } else {
                    let r = fx.jobs(JobsCommand::ReportResult {
                        task_id: t.id.clone(),
                        token,
                        outcome: TaskOutcome::Succeeded {
                            output: BTreeMap::from([("bytes_sent".into(), "10".into())]),
                        },
                    });
                    assert!(r.is_ok(), "{r:?}");
                }
            }
        }
        panic!("job {job} did not end");
    }

    fn view(fx: &Fixture, id: &str) -> InstanceView {
        fx.store
            .trove_instance(id)
            .expect("read")
            .expect("instance exists")
    }

    /// Exactly one member without `replica_of`, listing all the others.
    fn assert_one_source(fx: &Fixture, members: &[&str]) -> String {
        let sources: Vec<String> = members
            .iter()
            .map(|m| view(fx, m))
            .filter(|v| v.trove.replica_of.is_none())
            .map(|v| v.db.id)
            .collect();
        assert_eq!(sources.len(), 1, "sources: {sources:?}");
        let src = view(fx, &sources[0]);
        let mut listed = src.trove.replicas.clone();
        listed.sort();
        let mut others: Vec<String> = members
            .iter()
            .filter(|m| **m != sources[0])
            .map(|m| m.to_string())
            .collect();
        others.sort();
        assert_eq!(listed, others);
        for o in &others {
            let v = view(fx, o);
            assert_eq!(v.trove.replica_of.as_deref(), Some(sources[0].as_str()));
            let p = fx
                .store
                .get_pair(v.trove.feed_pair.as_deref().expect("feed pair"))
                .expect("read")
                .expect("pair");
            assert_eq!(
                p.source.volume_id, src.db.volume.id,
                "{o} fed by the source"
            );
            assert_eq!(p.target.volume_id, v.db.volume.id);
        }
        sources[0].clone()
    }

    /// A source m on h1 with replicas r1 (h2) and r2 (h3), all ACTIVE.
    fn replication_set(fx: &Fixture) {
        create(fx, "m", "j-m");
        assert_eq!(run(fx, "j-m", None), JobStatus::Success);
        let j = accepted_job(create_replicas(fx, "m", &["r1", "r2"], "j-r"));
        assert_eq!(view(fx, "r1").status(), "BUILD");
        assert_eq!(view(fx, "m").trove.replicas, vec!["r1", "r2"]);
        assert_eq!(run(fx, &j, None), JobStatus::Success);
        for id in ["m", "r1", "r2"] {
            let v = view(fx, id);
            assert_eq!((v.status(), v.operating_status()), ("ACTIVE", "HEALTHY"));
        }
    }

    #[test]
    fn create_builds_then_settles_active_healthy() {
        // TROVE-INST-CREATE
        let fx = fixture(&[("h1", "s1")]);
        let j = create(&fx, "i1", "j1");
        let v = view(&fx, "i1");
        assert_eq!((v.status(), v.operating_status()), ("BUILD", ""));
        assert_eq!(v.db.volume.size_bytes, GIB);
        assert_eq!(v.trove.flavor_id, "2");
        assert_eq!(run(&fx, &j, None), JobStatus::Success);
        let v = view(&fx, "i1");
        assert_eq!((v.status(), v.operating_status()), ("ACTIVE", "HEALTHY"));
        // The job is a native job with Trove's type.
        assert_eq!(fx.job(&j).job_type, "troveCreate");
    }

    #[test]
    fn failed_create_is_error_with_a_fault_and_can_be_deleted() {
        // TROVE-INST-CREATE, TROVE-INST-DELETE
        let fx = fixture(&[("h1", "s1")]);
        let j = create(&fx, "i1", "j1");
        assert_eq!(run(&fx, &j, Some("workload")), JobStatus::Fail);
        let v = view(&fx, "i1");
        assert_eq!(v.status(), "ERROR");
        assert!(v.trove.fault.is_some());
        let d = accepted_job(act(&fx, "i1", TroveAction::Delete, "j2"));
        // Deleting shows SHUTDOWN, or ERROR when the server is in error (§2.2).
        assert_eq!(view(&fx, "i1").status(), "ERROR");
        assert_eq!(run(&fx, &d, None), JobStatus::Success);
        assert!(fx.store.trove_instance("i1").expect("read").is_none());
        assert!(fx
            .store
            .trove_deleted_instance("i1")
            .expect("read")
            .is_some());
    }

    #[test]
    fn refusals_have_trove_kinds() {
        let fx = fixture(&[("h1", "s1"), ("h2", "s2")]);
        create(&fx, "i1", "j1");
        // Busy while building: 422; delete while BUILD: 422.
        assert_eq!(
            refusal(act(&fx, "i1", TroveAction::Restart, "j2")),
            RefusalKind::Unprocessable
        );
        assert_eq!(
            refusal(act(&fx, "i1", TroveAction::Delete, "j2")),
            RefusalKind::Unprocessable
        );
        run(&fx, "j1", None);
        // TROVE-ACT-PROMOTE of a non-replica, TROVE-ACT-EJECT of a non-source: 400.
        assert_eq!(
            refusal(act(&fx, "i1", TroveAction::Promote, "j3")),
            RefusalKind::BadRequest
        );
        assert_eq!(
            refusal(act(&fx, "i1", TroveAction::Eject, "j3")),
            RefusalKind::BadRequest
        );
        // TROVE-ACT-RESIZE-FLAVOR to the same or an unknown flavor: 400.
        for f in ["2", "99"] {
            assert_eq!(
                refusal(act(
                    &fx,
                    "i1",
                    TroveAction::ResizeFlavor {
                        flavor_id: f.into()
                    },
                    "j3"
                )),
                RefusalKind::BadRequest
            );
        }
        // TROVE-ACT-RESIZE-VOLUME: shrink 400, above the maximum 413.
        assert_eq!(
            refusal(act(
                &fx,
                "i1",
                TroveAction::ResizeVolume { size_gb: 1 },
                "j3"
            )),
            RefusalKind::BadRequest
        );
        assert_eq!(
            refusal(act(
                &fx,
                "i1",
                TroveAction::ResizeVolume { size_gb: 11 },
                "j3"
            )),
            RefusalKind::OverLimit
        );
        // Another project's instance is missing.
        let o = trove(
            &fx,
            TroveCommand::Act {
                id: "i1".into(),
                scope: Some("other".into()),
                action: TroveAction::Restart,
                job_id: "j3".into(),
            },
        );
        assert_eq!(refusal(o), RefusalKind::NotFound);
        // Detach of a non-replica: 400.
        assert_eq!(
            refusal(act(&fx, "i1", TroveAction::Detach, "j3")),
            RefusalKind::BadRequest
        );
        // A replica of a replica: Trove's Forbidden (401).
        let r = accepted_job(create_replicas(&fx, "i1", &["r1"], "j4"));
        run(&fx, &r, None);
        assert_eq!(
            refusal(create_replicas(&fx, "r1", &["r2"], "j5")),
            RefusalKind::Unauthorized
        );
        // Deleting a source with replicas: 403.
        assert_eq!(
            refusal(act(&fx, "i1", TroveAction::Delete, "j5")),
            RefusalKind::Forbidden
        );
        // No third host for another replica: 400.
        assert_eq!(
            refusal(create_replicas(&fx, "i1", &["r3"], "j6")),
            RefusalKind::BadRequest
        );
    }

    #[test]
    fn restart_resize_and_mgmt_actions_settle() {
        let fx = fixture(&[("h1", "s1"), ("h2", "s2")]);
        let j = create(&fx, "i1", "j1");
        run(&fx, &j, None);
        // TROVE-ACT-RESTART
        let j = accepted_job(act(&fx, "i1", TroveAction::Restart, "j2"));
        assert_eq!(view(&fx, "i1").status(), "REBOOT");
        assert_eq!(run(&fx, &j, None), JobStatus::Success);
        // TROVE-ACT-RESIZE-FLAVOR
        let j = accepted_job(act(
            &fx,
            "i1",
            TroveAction::ResizeFlavor {
                flavor_id: "3".into(),
            },
            "j3",
        ));
        assert_eq!(view(&fx, "i1").status(), "RESIZE");
        run(&fx, &j, None);
        let v = view(&fx, "i1");
        assert_eq!((v.trove.flavor_id.as_str(), v.db.flavor.vcpus), ("3", 2));
        // TROVE-ACT-RESIZE-VOLUME
        let j = accepted_job(act(
            &fx,
            "i1",
            TroveAction::ResizeVolume { size_gb: 2 },
            "j4",
        ));
        run(&fx, &j, None);
        assert_eq!(view(&fx, "i1").volume_gb(), 2);
        // TROVE-MGMT-STOP → SHUTDOWN; TROVE-MGMT-REBOOT → HEALTHY.
        let j = accepted_job(act(&fx, "i1", TroveAction::Stop, "j5"));
        run(&fx, &j, None);
        assert_eq!(view(&fx, "i1").operating_status(), "SHUTDOWN");
        let j = accepted_job(act(&fx, "i1", TroveAction::Reboot, "j6"));
        assert_eq!(view(&fx, "i1").status(), "REBOOT");
        run(&fx, &j, None);
        assert_eq!(view(&fx, "i1").operating_status(), "HEALTHY");
        // TROVE-MGMT-MIGRATE: RESIZE while moving, then on the other host.
        let j = accepted_job(act(&fx, "i1", TroveAction::Migrate { host: None }, "j7"));
        assert_eq!(view(&fx, "i1").status(), "RESIZE");
        run(&fx, &j, None);
        assert_eq!(view(&fx, "i1").db.host, "h2");
        // TROVE-MGMT-REBUILD
        let j = accepted_job(act(
            &fx,
            "i1",
            TroveAction::Rebuild {
                image_id: "img".into(),
            },
            "j8",
        ));
        assert_eq!(view(&fx, "i1").status(), "BUILD");
        run(&fx, &j, None);
        let v = view(&fx, "i1");
        assert_eq!(v.trove.image_id.as_deref(), Some("img"));
        assert_eq!((v.status(), v.operating_status()), ("ACTIVE", "HEALTHY"));
    }

    #[test]
    fn reset_status_and_reset_task_free_a_stuck_instance() {
        // TROVE-ACT-RESET-STATUS, TROVE-MGMT-RESET-TASK
        let fx = fixture(&[("h1", "s1")]);
        let j = create(&fx, "i1", "j1");
        run(&fx, &j, None);
        let j = accepted_job(act(&fx, "i1", TroveAction::Reboot, "j2"));
        assert!(matches!(
            act(&fx, "i1", TroveAction::ResetTask, "j3"),
            TroveOutcome::Accepted { job_id: None, .. }
        ));
        // The stuck job is cancelled and the instance is free.
        assert_eq!(fx.job(&j).status, JobStatus::Fail);
        let v = view(&fx, "i1");
        assert_eq!(v.trove.task, TroveTask::None);
        assert!(v.trove.busy_job.is_none());
        act(&fx, "i1", TroveAction::ResetStatus, "j4");
        let v = view(&fx, "i1");
        assert_eq!(v.operating_status(), "ERROR");
        // §2.3 refuses a restart now; an admin reboot recovers.
        assert_eq!(
            refusal(act(&fx, "i1", TroveAction::Restart, "j5")),
            RefusalKind::Unprocessable
        );
        let j = accepted_job(act(&fx, "i1", TroveAction::Reboot, "j6"));
        run(&fx, &j, None);
        assert_eq!(view(&fx, "i1").operating_status(), "HEALTHY");
    }

    #[test]
    fn promote_switches_the_whole_set() {
        // TROVE-ACT-PROMOTE
        let fx = fixture(&[("h1", "s1"), ("h2", "s2"), ("h3", "s3")]);
        replication_set(&fx);
        assert_eq!(assert_one_source(&fx, &["m", "r1", "r2"]), "m");
        let j = accepted_job(act(&fx, "r1", TroveAction::Promote, "jp"));
        for id in ["m", "r1", "r2"] {
            assert_eq!(view(&fx, id).status(), "PROMOTE");
        }
        // Still one source while it runs.
        assert_eq!(assert_one_source(&fx, &["m", "r1", "r2"]), "m");
        assert_eq!(run(&fx, &j, None), JobStatus::Success);
        assert_eq!(assert_one_source(&fx, &["m", "r1", "r2"]), "r1");
        assert_eq!(view(&fx, "r1").trove.replicas, vec!["m", "r2"]);
        for id in ["m", "r1", "r2"] {
            let v = view(&fx, id);
            assert_eq!((v.status(), v.operating_status()), ("ACTIVE", "HEALTHY"));
        }
        // Every pair of the set replicates from the new source.
        let pairs = fx.store.list_pairs().expect("pairs");
        assert_eq!(pairs.len(), 2, "{pairs:?}");
        assert!(pairs.iter().all(|p| p.state == PairState::Active));
        // TROVE-INST-UPDATE detach: r2 leaves, the source stops listing it.
        let j = accepted_job(act(&fx, "r2", TroveAction::Detach, "jd"));
        assert_eq!(view(&fx, "r2").status(), "DETACH");
        run(&fx, &j, None);
        assert!(view(&fx, "r2").trove.replica_of.is_none());
        assert_eq!(view(&fx, "r1").trove.replicas, vec!["m"]);
        assert_eq!(fx.store.list_pairs().expect("pairs").len(), 1);
    }

    #[test]
    fn failed_promotion_keeps_one_source() {
        let fx = fixture(&[("h1", "s1"), ("h2", "s2"), ("h3", "s3")]);
        replication_set(&fx);
        let j = accepted_job(act(&fx, "r1", TroveAction::Promote, "jp"));
        // The final sync fails: nothing was switched.
        assert_eq!(run(&fx, &j, Some("sync")), JobStatus::Fail);
        assert_eq!(assert_one_source(&fx, &["m", "r1", "r2"]), "m");
        assert_eq!(view(&fx, "r1").status(), "ERROR");
    }

    #[test]
    fn eject_elects_the_most_up_to_date_replica() {
        // TROVE-ACT-EJECT
        let mut fx = fixture(&[("h1", "s1"), ("h2", "s2"), ("h3", "s3")]);
        replication_set(&fx);
        // The source still heartbeats: refused.
        assert_eq!(
            refusal(act(&fx, "m", TroveAction::Eject, "je")),
            RefusalKind::BadRequest
        );
        // r2's pair syncs later than r1's: r2 holds the most recent data.
        fx.now += 5_000;
        let p2 = view(&fx, "r2").trove.feed_pair.expect("pair");
        let r = fx.apply(Command::Replication(ReplicationCommand::Operate {
            id: p2.clone(),
            op: PairOp::Sync {
                full: false,
                periodic: false,
            },
            job_id: "js".into(),
            job_type: "test".into(),
        }));
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(run(&fx, "js", None), JobStatus::Success);
        fx.now += 5_000;
        fx.inv(InventoryCommand::MarkHostOffline {
            name: "h1".into(),
            if_no_heartbeat_since_ms: None,
        })
        .expect("offline");
        let j = accepted_job(act(&fx, "m", TroveAction::Eject, "je"));
        for id in ["m", "r1", "r2"] {
            assert_eq!(view(&fx, id).status(), "EJECT");
        }
        assert_eq!(assert_one_source(&fx, &["m", "r1", "r2"]), "m");
        assert_eq!(run(&fx, &j, None), JobStatus::Success);
        assert_eq!(assert_one_source(&fx, &["r1", "r2"]), "r2");
        let m = view(&fx, "m");
        assert!(m.trove.replica_of.is_none() && m.trove.replicas.is_empty());
        for id in ["r1", "r2"] {
            let v = view(&fx, id);
            assert_eq!((v.status(), v.operating_status()), ("ACTIVE", "HEALTHY"));
        }
        // The ejected source can be deleted although its host is gone.
        let j = accepted_job(act(&fx, "m", TroveAction::Delete, "jdel"));
        assert_eq!(run(&fx, &j, None), JobStatus::Success);
        assert!(fx.store.trove_instance("m").expect("read").is_none());
        assert_eq!(fx.store.list_pairs().expect("pairs").len(), 1);
    }

    #[test]
    fn resize_volume_grows_the_replicas_too() {
        // TROVE-ACT-RESIZE-VOLUME on a source
        let fx = fixture(&[("h1", "s1"), ("h2", "s2"), ("h3", "s3")]);
        replication_set(&fx);
        let j = accepted_job(act(
            &fx,
            "m",
            TroveAction::ResizeVolume { size_gb: 3 },
            "jr",
        ));
        for id in ["m", "r1", "r2"] {
            assert_eq!(view(&fx, id).status(), "RESIZE");
        }
        run(&fx, &j, None);
        for id in ["m", "r1", "r2"] {
            assert_eq!(view(&fx, id).volume_gb(), 3, "{id}");
        }
    }

    #[test]
    fn agent_declared_databases_are_instances() {
        // TROVE-INST-LIST sees inventory databases that Trove never touched.
        let fx = fixture(&[("h1", "s1")]);
        let db = DatabaseInstance {
            id: "declared".into(),
            project: P.into(),
            name: "orders".into(),
            host: "h1".into(),
            status: DatabaseStatus::Active,
            volume: Volume {
                id: "declared-data".into(),
                size_bytes: 8 << 20,
                pool: "p1".into(),
                path: String::new(),
            },
            flavor: Flavor {
                vcpus: 2,
                ram_mb: 4096,
            },
            datastore: Datastore {
                kind: "mysql".into(),
                version: "8.0".into(),
            },
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        fx.inv(InventoryCommand::RegisterWorkloads {
            workloads: vec![inventory::Workload::Database(db)],
        })
        .expect("register");
        let all = fx.store.trove_instances(Some(P)).expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].trove.flavor_id, "3");
        assert_eq!(all[0].volume_gb(), 1);
        let j = accepted_job(act(&fx, "declared", TroveAction::Restart, "j1"));
        run(&fx, &j, None);
        assert_eq!(view(&fx, "declared").operating_status(), "HEALTHY");
    }
}
