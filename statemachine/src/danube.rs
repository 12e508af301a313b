//! Danube Cloud VM replicas: the Danube view of servers and pairs (DANUBE-REP-*,
//! DANUBE-TASK-*, DANUBE-VM-STATUS of ../shared/spec/danube.md).
//!
//! A Danube VM is an inventory server (`hostname` = its name, `uuid` = its id). A replica
//! (slave VM, `repname`) is one replication pair per disk of the master, owned by
//! `danube/replica/<uid>`, plus the record below. A Danube task *is* a job: its id is the
//! job id (in Danube's task-id format, made by the API), and this module keeps what the
//! Danube task API shows about it (view, parameters, final result).
//!
//! ```text
//!  CreateReplica ─► replica Creating, pairs Create (CreateTarget → full Sync, per disk)
//!       job SUCCESS ─► Ready                 job FAIL/revoked ─► record removed, the pairs
//!                                                                 deleted by a clean-up job
//!  UpdateReplica ─► pairs' enabled/sleep_time/bwlimit at once (job without tasks), or only
//!                   the reservation (no job: 205)
//!  FailoverReplica ─► [Stop master] → per pair PlannedFailover{keep_replicating:false}
//!                     (master node online) or UnplannedFailover → [Start slave if the
//!                     master ran]; SUCCESS: roles swap, reinit_required, service disabled
//!  ReinitReplica ─► Stop(old master) → per pair Reinit (Fence old master → delta Sync);
//!                   SUCCESS: reinit_required=false, enabled=true
//!  DeleteReplica ─► per pair Delete{delete_target} ; SUCCESS: record and reservation gone
//! ```
//!
//! Resources: "a replica takes the same resources as its master". The inventory allocates
//! the VM's vCPUs/RAM on the host its agent registered it on (`Server::host`), whatever
//! runs there. Danube's reservations make up the rest, so that every node carries what
//! really uses it ([`settle_reservations`], after every change and at every task end):
//! - the VM, when it runs on a node other than its registered host (after a failover):
//!   holder `danube-vm:<vm id>` on that node;
//! - each replica with `reserve_resources`, on the node holding it, unless that node is
//!   the VM's registered host (the inventory's allocation already counts it there):
//!   holder `danube:<uid>`; also without `reserve_resources` while a failover to it runs
//!   (the room the promoted VM needs, checked when the failover starts).
//!
//! So after a failover the replica's reservation follows the replica to the old master's
//! node and the running VM is charged where it runs; delete releases exactly the replica's
//! holder. (A replica without `reserve_resources` on the registered host is still counted
//! there by the inventory's allocation: the agent keeps reporting that VM.) The target
//! disks' bytes are reserved on the node's pools for the creation job (holder = the job id,
//! released when it ends); afterwards the agent reports them as used space.
//!
//! Where the VM runs after a failover is kept here ([`VmState`]), not in the inventory:
//! the inventory server stays the agent's registration (an agent re-registers its
//! configured workloads when it reconnects), the Danube view reads this overlay first.
//!
//! Column families: `danube`: `r/<vm>\0<repname>` → [`Replica`], `t/<job>` →
//! [`DanubeTask`], `v/<vm>` → [`VmState`]; `danube_index`: `p/<vm>\0<job>` for the VM's
//! unfinished Danube tasks, `u/<uid>` → `<vm>\0<repname>`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{CommandResult, Outcome};
use crate::error::{CommandError, StoreError};
use crate::inventory::{
    self, validate_host_name, validate_id, validate_project, ResourceAmount, Server, ServerStatus,
};
use crate::jobs::{
    self, Job, JobStatus, NewJob, NewTask, TaskKind, VolumeLayout, VolumeRef, WorkloadAction,
};
use crate::replication::{self, NewPair, PairOp, PairState, ReplicationCommand};
use crate::store::Store;
use crate::txn::Txn;

pub const CF_DANUBE: &str = "danube";
pub const CF_DANUBE_INDEX: &str = "danube_index";

pub const CFS: &[&str] = &[CF_DANUBE, CF_DANUBE_INDEX];

/// `VMS_VM_REPLICA_LIMIT`: replicas per master.
pub const REPLICA_LIMIT: usize = 1;
pub const REPNAME_MAX: usize = 24;
pub const ZPOOL_MAX: usize = 64;
pub const SLEEP_TIME_MAX: u32 = 86_400;
pub const SLEEP_TIME_DEFAULT: u32 = 60;
pub const BWLIMIT_MAX: u64 = 2_147_483_647;
/// Longest JSON text of a task's parameters kept for DANUBE-TASK-DETAIL.
pub const PARAMS_MAX: usize = 4096;
/// Attempts of the Start/Stop tasks of a failover.
pub const VM_TASK_ATTEMPTS: u32 = 3;

// The `detail` texts of Danube's refusals (spec §1.7). The API maps each to its status.
pub const ERR_VM_NOT_FOUND: &str = "VM not found";
pub const ERR_SLAVE_NOT_FOUND: &str = "Slave VM not found";
pub const ERR_SLAVE_EXISTS: &str = "Slave VM already exists";
pub const ERR_PENDING_TASKS: &str = "VM has pending tasks";
pub const ERR_NODE_NOT_OPERATIONAL: &str = "Node is not operational";
pub const ERR_VM_NOT_STOPPED_OR_RUNNING: &str = "VM is not stopped or running";
pub const ERR_VM_NOT_OPERATIONAL: &str = "VM is not operational";
pub const ERR_REINIT_REQUIRED: &str = "Reinitialization is required";
pub const ERR_REINIT_NOT_REQUIRED: &str = "Reinitialization is not required";
pub const ERR_NOT_ENOUGH_RESOURCES: &str = "Not enough free resources on target node";
pub const ERR_LIMIT_REACHED: &str = "Maximum number of server replicas reached.";
/// `NotFound` kinds of this module.
pub const KIND_VM: &str = "danube vm";
pub const KIND_REPLICA: &str = "danube replica";

// Job types of the Danube tasks.
pub const JOB_CREATE: &str = "danubeReplicaCreate";
pub const JOB_UPDATE: &str = "danubeReplicaUpdate";
pub const JOB_DELETE: &str = "danubeReplicaDelete";
pub const JOB_FAILOVER: &str = "danubeReplicaFailover";
pub const JOB_REINIT: &str = "danubeReplicaReinit";
pub const JOB_CLEANUP: &str = "danubeReplicaCleanup";

// ---------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// The creation task runs.
    Creating,
    Ready,
}

/// A slave VM (`repname`) of a master VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// The id of the task that created it; pairs and the reservation holder derive from it.
    pub uid: String,
    pub vm_id: String,
    pub project: String,
    pub repname: String,
    /// The node holding the slave now (swaps with `master_node` at failover).
    pub node: String,
    pub master_node: String,
    pub root_zpool: Option<String>,
    /// 1-based disk number → zpool.
    pub disk_zpools: BTreeMap<u32, String>,
    pub reserve_resources: bool,
    pub sleep_time: u32,
    pub enabled: bool,
    pub bwlimit: Option<u64>,
    /// One pair per disk, in disk order.
    pub pair_ids: Vec<String>,
    pub state: ReplicaState,
    pub reinit_required: bool,
    /// The master's flavor when the replica was made (what a reservation takes).
    pub vcpus: u32,
    pub ram_mb: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
}

impl Replica {
    /// The reservation holder of this replica's vCPUs and RAM.
    pub fn holder(&self) -> String {
        holder_of(&self.uid)
    }

    pub fn owner(&self) -> String {
        format!("danube/replica/{}", self.uid)
    }
}

pub fn holder_of(uid: &str) -> String {
    format!("danube:{uid}")
}

/// The reservation holder of a VM running away from its registered host.
pub fn vm_holder(vm_id: &str) -> String {
    format!("danube-vm:{vm_id}")
}

/// Where and how a VM runs once a Danube failover moved it (absent before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub vm_id: String,
    pub project: String,
    pub node: String,
    pub running: bool,
    /// The VM's disks where it runs now.
    pub disks: Vec<VolumeRef>,
    pub status_change_ms: u64,
}

/// What a finished task reports (DANUBE-TASK-STATUS `result`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub message: String,
    pub returncode: i32,
    pub detail: String,
    /// The replica fields the result carries (none on failure).
    pub replica: Option<ReplicaSnapshot>,
}

/// Replica fields as a task result shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSnapshot {
    pub repname: String,
    pub node: String,
    pub reserve_resources: bool,
    pub sleep_time: u32,
    /// `None` after a delete (`"enabled": null`).
    pub enabled: Option<bool>,
    pub reinit_required: bool,
    pub last_sync_ms: Option<u64>,
}

/// What a Danube task is, beside its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DanubeTask {
    pub id: String,
    pub project: String,
    pub user_id: String,
    pub user_name: String,
    /// `vm_replica`, `vm_replica_failover`, `vm_replica_reinit`.
    pub view: String,
    pub method: String,
    pub vm_id: String,
    pub hostname: String,
    pub repname: String,
    /// The request's parameters as JSON text (DANUBE-TASK-DETAIL).
    pub params_json: String,
    /// Whether the master ran when the task started.
    pub master_was_running: bool,
    pub result: Option<TaskResult>,
}

/// Who asks, and the task's id and parameters (made by the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub job_id: String,
    pub user_id: String,
    pub user_name: String,
    pub hostname: String,
    pub params_json: String,
}

/// DANUBE-REP-CREATE parameters (validated by the API; checked again here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateReplica {
    pub task: TaskInfo,
    pub project: String,
    pub vm_id: String,
    pub repname: String,
    pub node: String,
    pub root_zpool: Option<String>,
    pub disk_zpools: BTreeMap<u32, String>,
    pub reserve_resources: bool,
    pub sleep_time: u32,
    pub enabled: bool,
    pub bwlimit: Option<u64>,
}

/// Commands of this family. Add new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DanubeCommand {
    /// DANUBE-REP-CREATE. -> `DanubeOutcome::Task`.
    CreateReplica(Box<CreateReplica>),
    /// DANUBE-REP-UPDATE. Only `reserve_resources`: no task, -> `DanubeOutcome::Replica`;
    /// else -> `DanubeOutcome::Task` (a job without tasks: it ends at once).
    UpdateReplica {
        task: TaskInfo,
        project: String,
        vm_id: String,
        repname: String,
        reserve_resources: Option<bool>,
        sleep_time: Option<u32>,
        enabled: Option<bool>,
        /// `Some(None)`: no limit.
        bwlimit: Option<Option<u64>>,
    },
    /// DANUBE-REP-DELETE. -> `DanubeOutcome::Task`.
    DeleteReplica {
        task: TaskInfo,
        project: String,
        vm_id: String,
        repname: String,
    },
    /// DANUBE-REP-FAILOVER. -> `DanubeOutcome::Task`.
    FailoverReplica {
        task: TaskInfo,
        project: String,
        vm_id: String,
        repname: String,
        force: bool,
    },
    /// DANUBE-REP-REINIT. -> `DanubeOutcome::Task`.
    ReinitReplica {
        task: TaskInfo,
        project: String,
        vm_id: String,
        repname: String,
    },
}

pub fn validate_repname(repname: &str) -> Result<(), CommandError> {
    let ok = !repname.is_empty()
        && repname.len() <= REPNAME_MAX
        && repname
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && repname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        return Err(CommandError::invalid(
            "repname",
            format!(
                "Enter a valid value: 1 to {REPNAME_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit."
            ),
        ));
    }
    Ok(())
}

pub fn validate_zpool(field: &str, z: &str) -> Result<(), CommandError> {
    if z.len() > ZPOOL_MAX {
        return Err(CommandError::invalid(
            field,
            format!("Ensure this field has no more than {ZPOOL_MAX} characters."),
        ));
    }
    validate_host_name(field, z)
}

pub fn validate_sleep_time(s: u32) -> Result<(), CommandError> {
    if s > SLEEP_TIME_MAX {
        return Err(CommandError::invalid(
            "sleep_time",
            format!("Ensure this value is less than or equal to {SLEEP_TIME_MAX}."),
        ));
    }
    Ok(())
}

pub fn validate_bwlimit(b: u64) -> Result<(), CommandError> {
    if b > BWLIMIT_MAX {
        return Err(CommandError::invalid(
            "bwlimit",
            format!("Ensure this value is less than or equal to {BWLIMIT_MAX}."),
        ));
    }
    Ok(())
}

fn validate_task(t: &TaskInfo) -> Result<(), CommandError> {
    validate_id("task_id", &t.job_id)?;
    if t.job_id.len() > 64 {
        return Err(CommandError::invalid("task_id", "at most 64 characters"));
    }
    validate_id("user_id", &t.user_id)?;
    if t.user_name.len() > 255 || t.hostname.len() > 255 || t.params_json.len() > PARAMS_MAX {
        return Err(CommandError::invalid("params", "too long"));
    }
    Ok(())
}

fn validate_target(project: &str, vm_id: &str, repname: &str) -> Result<(), CommandError> {
    validate_project(project)?;
    validate_id("hostname_or_uuid", vm_id)?;
    validate_repname(repname)
}

impl DanubeCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            DanubeCommand::CreateReplica(c) => {
                validate_task(&c.task)?;
                validate_target(&c.project, &c.vm_id, &c.repname)?;
                validate_host_name("node", &c.node)?;
                if let Some(z) = &c.root_zpool {
                    validate_zpool("root_zpool", z)?;
                }
                if c.disk_zpools.len() > inventory::DISKS_MAX {
                    return Err(CommandError::invalid("disk_zpools", "too many disks"));
                }
                for z in c.disk_zpools.values() {
                    validate_zpool("disk_zpools", z)?;
                }
                validate_sleep_time(c.sleep_time)?;
                if let Some(b) = c.bwlimit {
                    validate_bwlimit(b)?;
                }
                Ok(())
            }
            DanubeCommand::UpdateReplica {
                task,
                project,
                vm_id,
                repname,
                sleep_time,
                bwlimit,
                ..
            } => {
                validate_task(task)?;
                validate_target(project, vm_id, repname)?;
                if let Some(s) = sleep_time {
                    validate_sleep_time(*s)?;
                }
                if let Some(Some(b)) = bwlimit {
                    validate_bwlimit(*b)?;
                }
                Ok(())
            }
            DanubeCommand::DeleteReplica {
                task,
                project,
                vm_id,
                repname,
            }
            | DanubeCommand::FailoverReplica {
                task,
                project,
                vm_id,
                repname,
                ..
            }
            | DanubeCommand::ReinitReplica {
                task,
                project,
                vm_id,
                repname,
            } => {
                validate_task(task)?;
                validate_target(project, vm_id, repname)
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DanubeCommand::CreateReplica(_) => "danube_create_replica",
            DanubeCommand::UpdateReplica { .. } => "danube_update_replica",
            DanubeCommand::DeleteReplica { .. } => "danube_delete_replica",
            DanubeCommand::FailoverReplica { .. } => "danube_failover_replica",
            DanubeCommand::ReinitReplica { .. } => "danube_reinit_replica",
        }
    }
}

/// What this family's commands produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DanubeOutcome {
    /// The task (job) started, as stored after the command.
    Task(Job),
    /// The replica as stored after a synchronous update.
    Replica(Replica),
}

// ---------------------------------------------------------------------------------------
// Keys and storage helpers
// ---------------------------------------------------------------------------------------

fn replica_key(vm_id: &str, repname: &str) -> Vec<u8> {
    let mut k = b"r/".to_vec();
    k.extend_from_slice(vm_id.as_bytes());
    k.push(0);
    k.extend_from_slice(repname.as_bytes());
    k
}

fn replica_prefix(vm_id: &str) -> Vec<u8> {
    replica_key(vm_id, "")
}

fn task_key(job_id: &str) -> Vec<u8> {
    let mut k = b"t/".to_vec();
    k.extend_from_slice(job_id.as_bytes());
    k
}

fn vm_key(vm_id: &str) -> Vec<u8> {
    let mut k = b"v/".to_vec();
    k.extend_from_slice(vm_id.as_bytes());
    k
}

fn pending_key(vm_id: &str, job_id: &str) -> Vec<u8> {
    let mut k = b"p/".to_vec();
    k.extend_from_slice(vm_id.as_bytes());
    k.push(0);
    k.extend_from_slice(job_id.as_bytes());
    k
}

fn uid_key(uid: &str) -> Vec<u8> {
    let mut k = b"u/".to_vec();
    k.extend_from_slice(uid.as_bytes());
    k
}

fn save_replica(txn: &mut Txn<'_>, r: &Replica) -> Result<(), StoreError> {
    txn.put_record(CF_DANUBE, &replica_key(&r.vm_id, &r.repname), r)?;
    let mut v = r.vm_id.as_bytes().to_vec();
    v.push(0);
    v.extend_from_slice(r.repname.as_bytes());
    txn.put(CF_DANUBE_INDEX, &uid_key(&r.uid), v)
}

fn remove_replica(txn: &mut Txn<'_>, r: &Replica, now: u64) -> Result<(), StoreError> {
    txn.delete(CF_DANUBE, &replica_key(&r.vm_id, &r.repname))?;
    txn.delete(CF_DANUBE_INDEX, &uid_key(&r.uid))?;
    inventory::release_holder(txn, &r.holder(), now)
}

fn load_replica(txn: &Txn<'_>, vm_id: &str, repname: &str) -> Result<Option<Replica>, StoreError> {
    txn.get_record(CF_DANUBE, &replica_key(vm_id, repname))
}

fn vm_not_found(vm_id: &str) -> CommandError {
    CommandError::NotFound {
        kind: KIND_VM.into(),
        id: vm_id.to_string(),
    }
}

fn replica_not_found(repname: &str) -> CommandError {
    CommandError::NotFound {
        kind: KIND_REPLICA.into(),
        id: repname.to_string(),
    }
}

fn conflict(detail: &str) -> CommandError {
    CommandError::Conflict(detail.to_string())
}

// ---------------------------------------------------------------------------------------
// The VM as Danube sees it
// ---------------------------------------------------------------------------------------

/// Danube's base VM status (without the not-ready `-`) of an inventory status.
pub fn base_status(s: ServerStatus) -> &'static str {
    match s {
        ServerStatus::Active => "running",
        ServerStatus::Shutoff => "stopped",
        ServerStatus::Build => "deploying",
        ServerStatus::Migrating | ServerStatus::Reboot => "notready",
        ServerStatus::Error => "error",
    }
}

/// The VM where it runs now: (node, base status, disks).
pub fn vm_location(server: &Server, overlay: Option<&VmState>) -> (String, String, Vec<VolumeRef>) {
    match overlay {
        Some(o) => (
            o.node.clone(),
            if o.running { "running" } else { "stopped" }.to_string(),
            o.disks.clone(),
        ),
        None => (
            server.host.clone(),
            base_status(server.status).to_string(),
            server
                .disks
                .iter()
                .map(|d| VolumeRef {
                    host: server.host.clone(),
                    pool: d.pool.clone(),
                    volume_id: d.id.clone(),
                    path: d.path.clone(),
                    size_bytes: d.size_bytes,
                    layout: VolumeLayout::Block,
                })
                .collect(),
        ),
    }
}

struct Master {
    server: Server,
    node: String,
    status: String,
    disks: Vec<VolumeRef>,
}

fn load_master(
    txn: &Txn<'_>,
    project: &str,
    vm_id: &str,
) -> Result<Result<Master, CommandError>, StoreError> {
    let Some(server) = txn.get_record::<Server>(inventory::CF_SERVERS, vm_id.as_bytes())? else {
        return Ok(Err(vm_not_found(vm_id)));
    };
    if server.project != project {
        return Ok(Err(vm_not_found(vm_id)));
    }
    let overlay: Option<VmState> = txn.get_record(CF_DANUBE, &vm_key(vm_id))?;
    let (node, status, disks) = vm_location(&server, overlay.as_ref());
    Ok(Ok(Master {
        server,
        node,
        status,
        disks,
    }))
}

fn node_online(txn: &Txn<'_>, node: &str) -> Result<bool, StoreError> {
    Ok(inventory::host_txn(txn, node)?.is_some_and(|h| h.is_online()))
}

fn has_pending(txn: &Txn<'_>, vm_id: &str) -> Result<Vec<String>, StoreError> {
    let mut prefix = b"p/".to_vec();
    prefix.extend_from_slice(vm_id.as_bytes());
    prefix.push(0);
    Ok(txn
        .scan_prefix(CF_DANUBE_INDEX, &prefix)?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
        .collect())
}

/// The oldest `last_sync` of the replica's pairs (every disk synced by then).
fn last_sync_txn(txn: &Txn<'_>, r: &Replica) -> Result<Option<u64>, StoreError> {
    let mut out: Option<u64> = None;
    for id in &r.pair_ids {
        let p = replication::load_pair(txn, id)?;
        match p.and_then(|p| p.last_sync_ms) {
            Some(t) => out = Some(out.map_or(t, |o| o.min(t))),
            None => return Ok(None),
        }
    }
    Ok(out)
}

fn snapshot(txn: &Txn<'_>, r: &Replica) -> Result<ReplicaSnapshot, StoreError> {
    Ok(ReplicaSnapshot {
        repname: r.repname.clone(),
        node: r.node.clone(),
        reserve_resources: r.reserve_resources,
        sleep_time: r.sleep_time,
        enabled: Some(r.enabled),
        reinit_required: r.reinit_required,
        last_sync_ms: last_sync_txn(txn, r)?,
    })
}

/// Pair settings from Danube's: `sleep_time` 0 means "sync continuously" (pairs need at
/// least 1 s); `bwlimit` 0 means no limit.
fn pair_sleep(s: u32) -> u32 {
    s.max(1)
}

fn pair_bwlimit(b: Option<u64>) -> Option<u64> {
    b.filter(|b| *b > 0)
}

// ---------------------------------------------------------------------------------------
// Reservations
// ---------------------------------------------------------------------------------------

fn compute_of(vcpus: u32, ram_mb: u64) -> ResourceAmount {
    ResourceAmount {
        vcpus,
        ram_mb,
        pool_bytes: BTreeMap::new(),
    }
}

/// The hosts where `holder` has a reservation (the inventory's `reservations_by_holder`
/// index: `holder \0 host`).
fn holder_hosts(txn: &Txn<'_>, holder: &str) -> Result<Vec<String>, StoreError> {
    let mut prefix = holder.as_bytes().to_vec();
    prefix.push(0);
    Ok(txn
        .scan_prefix(inventory::CF_RESERVATIONS_BY_HOLDER, &prefix)?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
        .collect())
}

/// Makes `holder` hold exactly `want` (host, amount), or nothing: released elsewhere,
/// placed or replaced there. Nothing is written when it already is so. The placement is
/// not checked against capacity: what runs (or was admitted) must be counted.
fn hold_exactly(
    txn: &mut Txn<'_>,
    holder: &str,
    want: Option<(&str, &ResourceAmount)>,
    now: u64,
) -> Result<(), StoreError> {
    let hosts = holder_hosts(txn, holder)?;
    if let Some((host, amount)) = want {
        if hosts.len() == 1 && hosts[0] == host {
            let same = inventory::host_txn(txn, host)?
                .and_then(|h| h.reservations.get(holder).map(|r| &r.resources == amount))
                .unwrap_or(false);
            if same {
                return Ok(());
            }
        }
    } else if hosts.is_empty() {
        return Ok(());
    }
    if hosts.iter().any(|h| Some(h.as_str()) != want.map(|w| w.0)) {
        inventory::release_holder(txn, holder, now)?;
    }
    if let Some((host, amount)) = want {
        if let Some(mut h) = inventory::host_txn(txn, host)? {
            inventory::put_reservation(txn, &mut h, holder, amount, now)?;
        }
    }
    Ok(())
}

/// Sets the VM's Danube reservations to what runs and is held where (module doc): the VM
/// on a node other than its registered host, each replica with `reserve_resources` (or
/// with a failover to it running) on its node unless that is the registered host.
pub(crate) fn settle_reservations(
    txn: &mut Txn<'_>,
    vm_id: &str,
    now: u64,
) -> Result<(), StoreError> {
    let server: Option<Server> = txn.get_record(inventory::CF_SERVERS, vm_id.as_bytes())?;
    let overlay: Option<VmState> = txn.get_record(CF_DANUBE, &vm_key(vm_id))?;
    let registered = server.as_ref().map(|s| s.host.clone());
    let running_away = match (&server, &overlay) {
        (Some(s), Some(o)) if o.node != s.host => {
            Some((o.node.clone(), compute_of(s.flavor.vcpus, s.flavor.ram_mb)))
        }
        _ => None,
    };
    hold_exactly(
        txn,
        &vm_holder(vm_id),
        running_away.as_ref().map(|(n, a)| (n.as_str(), a)),
        now,
    )?;
    let mut failing_over = Vec::new();
    for job_id in has_pending(txn, vm_id)? {
        if let Some(t) = txn.get_record::<DanubeTask>(CF_DANUBE, &task_key(&job_id))? {
            if t.view == "vm_replica_failover" {
                failing_over.push(t.repname);
            }
        }
    }
    for (_, v) in txn.scan_prefix(CF_DANUBE, &replica_prefix(vm_id))? {
        let r: Replica = crate::codec::decode(&v)?;
        let hold = (r.reserve_resources || failing_over.contains(&r.repname))
            && registered.as_deref() != Some(r.node.as_str());
        let amount = compute_of(r.vcpus, r.ram_mb);
        hold_exactly(
            txn,
            &r.holder(),
            hold.then_some((r.node.as_str(), &amount)),
            now,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------

pub(crate) fn apply(
    txn: &mut Txn<'_>,
    cmd: &DanubeCommand,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let r = match cmd {
        DanubeCommand::CreateReplica(c) => create(txn, c, now)?,
        DanubeCommand::UpdateReplica {
            task,
            project,
            vm_id,
            repname,
            reserve_resources,
            sleep_time,
            enabled,
            bwlimit,
        } => update(
            txn,
            task,
            project,
            vm_id,
            repname,
            UpdateArgs {
                reserve_resources: *reserve_resources,
                sleep_time: *sleep_time,
                enabled: *enabled,
                bwlimit: *bwlimit,
            },
            now,
        )?,
        DanubeCommand::DeleteReplica {
            task,
            project,
            vm_id,
            repname,
        } => delete(txn, task, project, vm_id, repname, now)?,
        DanubeCommand::FailoverReplica {
            task,
            project,
            vm_id,
            repname,
            force,
        } => failover(txn, task, project, vm_id, repname, *force, now)?,
        DanubeCommand::ReinitReplica {
            task,
            project,
            vm_id,
            repname,
        } => reinit(txn, task, project, vm_id, repname, now)?,
    };
    Ok(r.map(|o| Outcome::Danube(Box::new(o))))
}

type Applied = Result<Result<DanubeOutcome, CommandError>, StoreError>;

/// Stages the task record, the job and the VM's pending mark; ends an empty job.
#[allow(clippy::too_many_arguments)]
fn start_task(
    txn: &mut Txn<'_>,
    info: &TaskInfo,
    project: &str,
    view: &str,
    method: &str,
    vm_id: &str,
    repname: &str,
    master_was_running: bool,
    job: &NewJob,
    now: u64,
) -> Result<Job, StoreError> {
    let task = DanubeTask {
        id: info.job_id.clone(),
        project: project.to_string(),
        user_id: info.user_id.clone(),
        user_name: info.user_name.clone(),
        view: view.to_string(),
        method: method.to_string(),
        vm_id: vm_id.to_string(),
        hostname: info.hostname.clone(),
        repname: repname.to_string(),
        params_json: info.params_json.clone(),
        master_was_running,
        result: None,
    };
    txn.put_record(CF_DANUBE, &task_key(&task.id), &task)?;
    txn.put(CF_DANUBE_INDEX, &pending_key(vm_id, &task.id), Vec::new())?;
    let staged = jobs::insert_job(txn, job, None, now)?;
    jobs::finish_if_empty(txn, &staged.id, now)?;
    Ok(jobs::load_job_txn(txn, &staged.id)?.unwrap_or(staged))
}

fn new_job(info: &TaskInfo, job_type: &str, project: &str, vm_id: &str, repname: &str) -> NewJob {
    NewJob {
        id: info.job_id.clone(),
        job_type: job_type.to_string(),
        project: project.to_string(),
        entities: BTreeMap::from([
            ("vm_id".to_string(), vm_id.to_string()),
            ("repname".to_string(), repname.to_string()),
            ("danube_task_id".to_string(), info.job_id.clone()),
        ]),
        tasks: Vec::new(),
        sub_jobs: Vec::new(),
    }
}

fn vm_task(
    job: &NewJob,
    name: &str,
    host: &str,
    vm_id: &str,
    action: WorkloadAction,
    deps: Vec<String>,
) -> NewTask {
    NewTask {
        id: format!("{}:{name}", job.id),
        kind: TaskKind::Workload {
            host: host.to_string(),
            workload_kind: "server".to_string(),
            workload_id: vm_id.to_string(),
            action,
        },
        depends_on: deps,
        max_attempts: VM_TASK_ATTEMPTS,
        host: None,
    }
}

fn create(txn: &mut Txn<'_>, c: &CreateReplica, now: u64) -> Applied {
    // ---- checks (nothing staged) ----
    let m = match load_master(txn, &c.project, &c.vm_id)? {
        Ok(m) => m,
        Err(e) => return Ok(Err(e)),
    };
    if load_replica(txn, &c.vm_id, &c.repname)?.is_some() {
        return Ok(Err(CommandError::AlreadyExists {
            kind: KIND_REPLICA.into(),
            id: c.repname.clone(),
        }));
    }
    if txn.scan_prefix(CF_DANUBE, &replica_prefix(&c.vm_id))?.len() >= REPLICA_LIMIT {
        return Ok(Err(CommandError::invalid(
            "non_field_errors",
            ERR_LIMIT_REACHED,
        )));
    }
    if !has_pending(txn, &c.vm_id)?.is_empty() {
        return Ok(Err(conflict(ERR_PENDING_TASKS)));
    }
    if m.status != "running" && m.status != "stopped" {
        return Ok(Err(conflict(ERR_VM_NOT_STOPPED_OR_RUNNING)));
    }
    if !node_online(txn, &m.node)? {
        return Ok(Err(conflict(ERR_NODE_NOT_OPERATIONAL)));
    }
    let Some(target) = inventory::host_txn(txn, &c.node)? else {
        return Ok(Err(CommandError::invalid(
            "node",
            format!("Object with hostname={} does not exist.", c.node),
        )));
    };
    if c.node == m.node {
        return Ok(Err(CommandError::invalid(
            "node",
            "Target node is the same as current node.",
        )));
    }
    if !target.is_online() {
        return Ok(Err(conflict(ERR_NODE_NOT_OPERATIONAL)));
    }
    if let Some(z) = &c.root_zpool {
        if target.pool(z).is_none() {
            return Ok(Err(CommandError::invalid(
                "root_zpool",
                format!("Zpool \"{z}\" does not exist on node {}.", c.node),
            )));
        }
    }
    for (disk, z) in &c.disk_zpools {
        if *disk == 0 || *disk as usize > m.disks.len() {
            return Ok(Err(CommandError::invalid(
                "disk_zpools",
                format!(
                    "Invalid disk_id {disk}: the VM has {} disk(s).",
                    m.disks.len()
                ),
            )));
        }
        if target.pool(z).is_none() {
            return Ok(Err(CommandError::invalid(
                "disk_zpools",
                format!("Zpool \"{z}\" does not exist on node {}.", c.node),
            )));
        }
    }
    // Target volumes, one per disk.
    let uid = &c.task.job_id;
    let mut pairs = Vec::with_capacity(m.disks.len());
    let mut storage = ResourceAmount::default();
    for (i, src) in m.disks.iter().enumerate() {
        let n = i as u32 + 1;
        let pool = c
            .disk_zpools
            .get(&n)
            .or(c.root_zpool.as_ref())
            .cloned()
            .unwrap_or_else(|| src.pool.clone());
        if target.pool(&pool).is_none() {
            return Ok(Err(CommandError::invalid(
                "node",
                format!("Zpool \"{pool}\" of disk {n} does not exist on node {}; choose root_zpool or disk_zpools.", c.node),
            )));
        }
        *storage.pool_bytes.entry(pool.clone()).or_insert(0) += src.size_bytes;
        pairs.push(NewPair {
            id: format!("danube-{uid}-d{n}"),
            project: c.project.clone(),
            owner: format!("danube/replica/{uid}"),
            source: src.clone(),
            target: VolumeRef {
                host: c.node.clone(),
                pool,
                volume_id: format!("{}-{uid}-d{n}", c.repname),
                path: String::new(),
                size_bytes: src.size_bytes,
                layout: VolumeLayout::Block,
            },
            enabled: c.enabled,
            sleep_time_s: pair_sleep(c.sleep_time),
            bwlimit_bytes_per_sec: pair_bwlimit(c.bwlimit),
        });
    }
    let holder = holder_of(uid);
    let compute = compute_of(m.server.flavor.vcpus, m.server.flavor.ram_mb);
    // On the VM's registered host the inventory's allocation already counts it.
    if c.reserve_resources && c.node != m.server.host {
        if let Err(e) = inventory::check_reserve(txn, &c.node, &holder, &compute)? {
            return Ok(Err(as_node_error(e)));
        }
    }
    if let Err(e) = inventory::check_reserve(txn, &c.node, uid, &storage)? {
        return Ok(Err(as_node_error(e)));
    }
    for p in &pairs {
        if let Err(e) = replication::check_new_pair(txn, p)? {
            return Ok(Err(e));
        }
    }
    let mut job = new_job(&c.task, JOB_CREATE, &c.project, &c.vm_id, &c.repname);
    job.entities.insert("node".into(), c.node.clone());
    let mut staged_pairs = Vec::new();
    for p in &pairs {
        // Planned against the pair as insert_pair will stage it.
        let probe = replication::Pair {
            id: p.id.clone(),
            project: p.project.clone(),
            owner: p.owner.clone(),
            source: p.source.clone(),
            target: p.target.clone(),
            state: PairState::Creating,
            enabled: p.enabled,
            sleep_time_s: p.sleep_time_s,
            bwlimit_bytes_per_sec: p.bwlimit_bytes_per_sec,
            busy_job: None,
            pending_op: None,
            sync_started_ms: None,
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
        };
        replication::plan_op(&probe, &PairOp::Create, &mut job, &[]);
        staged_pairs.push(p);
    }
    if let Err(e) = jobs::validate_new_job(&job) {
        return Ok(Err(e));
    }
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    // ---- writes ----
    for p in staged_pairs {
        replication::insert_pair(txn, p, &job.id, now)?;
    }
    if let Ok(mut h) = inventory::check_reserve(txn, &c.node, uid, &storage)? {
        inventory::put_reservation(txn, &mut h, uid, &storage, now)?;
    }
    let rep = Replica {
        uid: uid.clone(),
        vm_id: c.vm_id.clone(),
        project: c.project.clone(),
        repname: c.repname.clone(),
        node: c.node.clone(),
        master_node: m.node.clone(),
        root_zpool: c.root_zpool.clone(),
        disk_zpools: c.disk_zpools.clone(),
        reserve_resources: c.reserve_resources,
        sleep_time: c.sleep_time,
        enabled: c.enabled,
        bwlimit: c.bwlimit,
        pair_ids: pairs.iter().map(|p| p.id.clone()).collect(),
        state: ReplicaState::Creating,
        reinit_required: false,
        vcpus: m.server.flavor.vcpus,
        ram_mb: m.server.flavor.ram_mb,
        created_ms: now,
        updated_ms: now,
    };
    save_replica(txn, &rep)?;
    let running = m.status == "running";
    let j = start_task(
        txn,
        &c.task,
        &c.project,
        "vm_replica",
        "POST",
        &c.vm_id,
        &c.repname,
        running,
        &job,
        now,
    )?;
    settle_reservations(txn, &c.vm_id, now)?;
    Ok(Ok(DanubeOutcome::Task(j)))
}

/// Resource shortages are reported under `node` (spec: "errors about node resources/storage
/// are reported under node").
fn as_node_error(e: CommandError) -> CommandError {
    match e {
        CommandError::Conflict(m) if m.starts_with("insufficient") => CommandError::invalid(
            "node",
            format!("Not enough free resources on target node: {m}"),
        ),
        other => other,
    }
}

struct UpdateArgs {
    reserve_resources: Option<bool>,
    sleep_time: Option<u32>,
    enabled: Option<bool>,
    bwlimit: Option<Option<u64>>,
}

fn load_for_op(
    txn: &Txn<'_>,
    project: &str,
    vm_id: &str,
    repname: &str,
) -> Result<Result<(Master, Replica), CommandError>, StoreError> {
    let m = match load_master(txn, project, vm_id)? {
        Ok(m) => m,
        Err(e) => return Ok(Err(e)),
    };
    let Some(r) = load_replica(txn, vm_id, repname)? else {
        return Ok(Err(replica_not_found(repname)));
    };
    Ok(Ok((m, r)))
}

fn operational(status: &str) -> bool {
    matches!(status, "running" | "stopped" | "stopping")
}

/// Both nodes online (`master`: the master's node too).
fn check_nodes(
    txn: &Txn<'_>,
    m: &Master,
    r: &Replica,
    master: bool,
) -> Result<Result<(), CommandError>, StoreError> {
    if (master && !node_online(txn, &m.node)?) || !node_online(txn, &r.node)? {
        return Ok(Err(conflict(ERR_NODE_NOT_OPERATIONAL)));
    }
    Ok(Ok(()))
}

#[allow(clippy::too_many_arguments)]
fn update(
    txn: &mut Txn<'_>,
    task: &TaskInfo,
    project: &str,
    vm_id: &str,
    repname: &str,
    a: UpdateArgs,
    now: u64,
) -> Applied {
    let (m, old) = match load_for_op(txn, project, vm_id, repname)? {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    if !operational(&m.status) {
        return Ok(Err(conflict(ERR_VM_NOT_OPERATIONAL)));
    }
    if let Err(e) = check_nodes(txn, &m, &old, true)? {
        return Ok(Err(e));
    }
    if old.reinit_required {
        return Ok(Err(conflict(ERR_REINIT_REQUIRED)));
    }
    let mut r = old.clone();
    let compute = compute_of(r.vcpus, r.ram_mb);
    let reserve_change = a.reserve_resources.filter(|v| *v != old.reserve_resources);
    if reserve_change == Some(true) && r.node != m.server.host {
        if let Err(e) = inventory::check_reserve(txn, &r.node, &r.holder(), &compute)? {
            return Ok(Err(as_node_error(e)));
        }
    }
    let only_reserve = a.sleep_time.is_none() && a.enabled.is_none() && a.bwlimit.is_none();
    let job = new_job(task, JOB_UPDATE, project, vm_id, repname);
    if !only_reserve {
        if let Err(e) = jobs::check_new_job(txn, &job)? {
            return Ok(Err(e));
        }
    }
    // ---- writes ----
    if let Some(v) = a.reserve_resources {
        r.reserve_resources = v;
    }
    if let Some(v) = a.sleep_time {
        r.sleep_time = v;
    }
    if let Some(v) = a.enabled {
        r.enabled = v;
    }
    if let Some(v) = a.bwlimit {
        r.bwlimit = v;
    }
    r.updated_ms = now;
    save_replica(txn, &r)?;
    if reserve_change.is_some() {
        settle_reservations(txn, vm_id, now)?;
    }
    if only_reserve {
        return Ok(Ok(DanubeOutcome::Replica(r)));
    }
    for id in &r.pair_ids {
        let cmd = ReplicationCommand::Update {
            id: id.clone(),
            enabled: a.enabled,
            sleep_time_s: a.sleep_time.map(pair_sleep),
            bwlimit_bytes_per_sec: a.bwlimit.map(pair_bwlimit),
        };
        // A missing pair (removed by hand) is skipped; the replica shows what is left.
        let _ = replication::apply(txn, &cmd, now)?;
    }
    let running = m.status == "running";
    let j = start_task(
        txn,
        task,
        project,
        "vm_replica",
        "PUT",
        vm_id,
        repname,
        running,
        &job,
        now,
    )?;
    Ok(Ok(DanubeOutcome::Task(j)))
}

/// Marks every pair of the replica busy with `job` doing `op(pair)` after checking them
/// all; plans the op's tasks after `after`. Returns the ids of the ops' last tasks.
fn check_pairs(
    txn: &Txn<'_>,
    r: &Replica,
    op: &dyn Fn(&replication::Pair) -> PairOp,
) -> Result<Result<Vec<(replication::Pair, PairOp)>, CommandError>, StoreError> {
    let mut out = Vec::new();
    for id in &r.pair_ids {
        let Some(p) = replication::load_pair(txn, id)? else {
            continue;
        };
        let o = op(&p);
        if let Err(e) = replication::check_op(&p, &o) {
            return Ok(Err(match e {
                CommandError::Conflict(m) if m.contains("is busy with job") => {
                    conflict(ERR_PENDING_TASKS)
                }
                other => other,
            }));
        }
        out.push((p, o));
    }
    Ok(Ok(out))
}

fn begin_pairs(
    txn: &mut Txn<'_>,
    ops: &[(replication::Pair, PairOp)],
    job_id: &str,
    now: u64,
) -> Result<Result<(), CommandError>, StoreError> {
    for (p, o) in ops {
        if let Err(e) = replication::begin_op(txn, &p.id, o, job_id, now)? {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

fn delete(
    txn: &mut Txn<'_>,
    task: &TaskInfo,
    project: &str,
    vm_id: &str,
    repname: &str,
    now: u64,
) -> Applied {
    let (m, r) = match load_for_op(txn, project, vm_id, repname)? {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    if !operational(&m.status) {
        return Ok(Err(conflict(ERR_VM_NOT_OPERATIONAL)));
    }
    if let Err(e) = check_nodes(txn, &m, &r, true)? {
        return Ok(Err(e));
    }
    let ops = match check_pairs(txn, &r, &|_| PairOp::Delete {
        delete_target: true,
    })? {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    let mut job = new_job(task, JOB_DELETE, project, vm_id, repname);
    for (p, o) in &ops {
        replication::plan_op(p, o, &mut job, &[]);
    }
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    if let Err(e) = begin_pairs(txn, &ops, &job.id, now)? {
        return Ok(Err(e));
    }
    let running = m.status == "running";
    let j = start_task(
        txn,
        task,
        project,
        "vm_replica",
        "DELETE",
        vm_id,
        repname,
        running,
        &job,
        now,
    )?;
    Ok(Ok(DanubeOutcome::Task(j)))
}

#[allow(clippy::too_many_arguments)]
fn failover(
    txn: &mut Txn<'_>,
    task: &TaskInfo,
    project: &str,
    vm_id: &str,
    repname: &str,
    force: bool,
    now: u64,
) -> Applied {
    let (m, r) = match load_for_op(txn, project, vm_id, repname)? {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    if r.reinit_required {
        return Ok(Err(conflict(ERR_REINIT_REQUIRED)));
    }
    let pending = has_pending(txn, vm_id)?;
    if !pending.is_empty() && !force {
        return Ok(Err(conflict(ERR_PENDING_TASKS)));
    }
    // The replica's own creation (or another operation on it) cannot be forced away.
    if r.state == ReplicaState::Creating {
        return Ok(Err(conflict(ERR_PENDING_TASKS)));
    }
    if !node_online(txn, &r.node)? {
        return Ok(Err(conflict(ERR_NODE_NOT_OPERATIONAL)));
    }
    let compute = compute_of(r.vcpus, r.ram_mb);
    // The promoted VM needs room on the replica's node: held already with
    // `reserve_resources`, or by the inventory's allocation on the VM's registered host.
    if !r.reserve_resources && r.node != m.server.host {
        if let Err(e) = inventory::check_reserve(txn, &r.node, &r.holder(), &compute)? {
            if matches!(e, CommandError::Conflict(_)) {
                return Ok(Err(conflict(ERR_NOT_ENOUGH_RESOURCES)));
            }
            return Ok(Err(e));
        }
    }
    let master_online = node_online(txn, &m.node)?;
    // Pending tasks on the pairs themselves (not a preemptible periodic sync) block even
    // with force: they are this replica's own update/delete/reinit.
    let planned = |p: &replication::Pair| {
        if master_online && p.state == PairState::Active {
            PairOp::PlannedFailover {
                keep_replicating: false,
            }
        } else {
            PairOp::UnplannedFailover
        }
    };
    let ops = match check_pairs(txn, &r, &planned)? {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    let running = m.status == "running";
    let mut job = new_job(task, JOB_FAILOVER, project, vm_id, repname);
    job.entities.insert("force".into(), force.to_string());
    let mut after = Vec::new();
    if master_online {
        let stop = vm_task(
            &job,
            "stop",
            &m.node,
            vm_id,
            WorkloadAction::Stop,
            Vec::new(),
        );
        after.push(stop.id.clone());
        job.tasks.push(stop);
    }
    let mut last = Vec::new();
    for (p, o) in &ops {
        let l = replication::plan_op(p, o, &mut job, &after);
        last.extend(if l.is_empty() { after.clone() } else { l });
    }
    if running {
        let start = vm_task(&job, "start", &r.node, vm_id, WorkloadAction::Start, last);
        job.tasks.push(start);
    }
    if let Err(e) = jobs::validate_new_job(&job) {
        return Ok(Err(e));
    }
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    // ---- writes ----
    if force {
        for other in pending {
            if other != task.job_id {
                jobs::cancel_job(
                    txn,
                    &other,
                    &format!("cancelled by the forced failover task {}", task.job_id),
                    now,
                )?;
            }
        }
    }
    if let Err(e) = begin_pairs(txn, &ops, &job.id, now)? {
        return Ok(Err(e));
    }
    let j = start_task(
        txn,
        task,
        project,
        "vm_replica_failover",
        "PUT",
        vm_id,
        repname,
        running,
        &job,
        now,
    )?;
    // While the failover runs the replica's node holds the room (see settle_reservations).
    settle_reservations(txn, vm_id, now)?;
    Ok(Ok(DanubeOutcome::Task(j)))
}

fn reinit(
    txn: &mut Txn<'_>,
    task: &TaskInfo,
    project: &str,
    vm_id: &str,
    repname: &str,
    now: u64,
) -> Applied {
    let (m, r) = match load_for_op(txn, project, vm_id, repname)? {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    if !operational(&m.status) {
        return Ok(Err(conflict(ERR_VM_NOT_OPERATIONAL)));
    }
    if let Err(e) = check_nodes(txn, &m, &r, true)? {
        return Ok(Err(e));
    }
    if !r.reinit_required {
        return Ok(Err(conflict(ERR_REINIT_NOT_REQUIRED)));
    }
    if !has_pending(txn, vm_id)?.is_empty() {
        return Ok(Err(conflict(ERR_PENDING_TASKS)));
    }
    let ops = match check_pairs(txn, &r, &|_| PairOp::Reinit)? {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    let mut job = new_job(task, JOB_REINIT, project, vm_id, repname);
    // The old master may still run (an unplanned failover could not stop it).
    let stop = vm_task(
        &job,
        "stop",
        &r.node,
        vm_id,
        WorkloadAction::Stop,
        Vec::new(),
    );
    let after = vec![stop.id.clone()];
    job.tasks.push(stop);
    for (p, o) in &ops {
        replication::plan_op(p, o, &mut job, &after);
    }
    if let Err(e) = jobs::validate_new_job(&job) {
        return Ok(Err(e));
    }
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    if let Err(e) = begin_pairs(txn, &ops, &job.id, now)? {
        return Ok(Err(e));
    }
    // Reinit forces the service on, with the stored sleep_time and bwlimit.
    for id in &r.pair_ids {
        let cmd = ReplicationCommand::Update {
            id: id.clone(),
            enabled: Some(true),
            sleep_time_s: Some(pair_sleep(r.sleep_time)),
            bwlimit_bytes_per_sec: Some(pair_bwlimit(r.bwlimit)),
        };
        let _ = replication::apply(txn, &cmd, now)?;
    }
    let running = m.status == "running";
    let j = start_task(
        txn,
        task,
        project,
        "vm_replica_reinit",
        "PUT",
        vm_id,
        repname,
        running,
        &job,
        now,
    )?;
    Ok(Ok(DanubeOutcome::Task(j)))
}

// ---------------------------------------------------------------------------------------
// Job end
// ---------------------------------------------------------------------------------------

fn failure_result(job: &Job) -> TaskResult {
    let reason = job
        .fail_reason
        .clone()
        .unwrap_or_else(|| "the task failed".to_string());
    TaskResult {
        message: "Got bad return code (1)".to_string(),
        returncode: 1,
        detail: reason,
        replica: None,
    }
}

/// Called whenever a job ends (SUCCESS or FAIL), after the pairs it held moved on.
pub(crate) fn on_job_end(txn: &mut Txn<'_>, job: &Job, now: u64) -> Result<(), StoreError> {
    let Some(mut task) = txn.get_record::<DanubeTask>(CF_DANUBE, &task_key(&job.id))? else {
        return Ok(());
    };
    if task.result.is_some() {
        return Ok(());
    }
    txn.delete(CF_DANUBE_INDEX, &pending_key(&task.vm_id, &task.id))?;
    let ok = job.status == JobStatus::Success;
    let rep = load_replica(txn, &task.vm_id, &task.repname)?;
    let result = match (job.job_type.as_str(), rep) {
        (JOB_CREATE, Some(mut r)) if r.uid == job.id => {
            if ok {
                r.state = ReplicaState::Ready;
                r.updated_ms = now;
                save_replica(txn, &r)?;
                success(
                    txn,
                    &r,
                    "Server replica was successfully initialized",
                    &task,
                )?
            } else {
                remove_replica(txn, &r, now)?;
                cleanup_pairs(txn, &r, now)?;
                failure_result(job)
            }
        }
        (JOB_DELETE, Some(r)) => {
            if ok {
                let mut snap = snapshot(txn, &r)?;
                snap.enabled = None;
                snap.last_sync_ms = None;
                remove_replica(txn, &r, now)?;
                TaskResult {
                    message: "Server replica was successfully destroyed".into(),
                    returncode: 0,
                    detail: detail(&r.repname, "Successfully destroyed"),
                    replica: Some(snap),
                }
            } else {
                failure_result(job)
            }
        }
        (JOB_FAILOVER, Some(mut r)) => {
            if ok {
                let disks: Vec<VolumeRef> = r
                    .pair_ids
                    .iter()
                    .filter_map(|id| replication::load_pair(txn, id).ok().flatten())
                    .map(|p| p.source)
                    .collect();
                let state = VmState {
                    vm_id: r.vm_id.clone(),
                    project: r.project.clone(),
                    node: r.node.clone(),
                    running: task.master_was_running,
                    disks,
                    status_change_ms: now,
                };
                txn.put_record(CF_DANUBE, &vm_key(&r.vm_id), &state)?;
                std::mem::swap(&mut r.node, &mut r.master_node);
                r.reinit_required = true;
                r.enabled = false;
                r.updated_ms = now;
                save_replica(txn, &r)?;
                success(
                    txn,
                    &r,
                    "Server replica was successfully promoted to master",
                    &task,
                )?
            } else {
                failure_result(job)
            }
        }
        (JOB_REINIT, Some(mut r)) => {
            if ok {
                r.reinit_required = false;
                r.enabled = true;
                r.updated_ms = now;
                save_replica(txn, &r)?;
                success(
                    txn,
                    &r,
                    "Server replica was successfully reinitialized",
                    &task,
                )?
            } else {
                failure_result(job)
            }
        }
        (JOB_UPDATE, Some(r)) => {
            if ok {
                success(
                    txn,
                    &r,
                    "Server replication service was successfully updated",
                    &task,
                )?
            } else {
                failure_result(job)
            }
        }
        _ => {
            if ok {
                TaskResult {
                    message: "Task finished".into(),
                    returncode: 0,
                    detail: String::new(),
                    replica: None,
                }
            } else {
                failure_result(job)
            }
        }
    };
    task.result = Some(result);
    txn.put_record(CF_DANUBE, &task_key(&task.id), &task)?;
    // Where the VM and its replicas are now decides what is reserved where.
    settle_reservations(txn, &task.vm_id, now)
}

fn detail(repname: &str, msg: &str) -> String {
    format!("repname='{repname}', msg='{msg}', rc=0")
}

fn success(
    txn: &Txn<'_>,
    r: &Replica,
    message: &str,
    _task: &DanubeTask,
) -> Result<TaskResult, StoreError> {
    Ok(TaskResult {
        message: message.to_string(),
        returncode: 0,
        detail: detail(&r.repname, message),
        replica: Some(snapshot(txn, r)?),
    })
}

/// After a failed or revoked creation: delete the pairs and whatever target data exists,
/// in a clean-up job of its own (`<job>.cleanup`).
fn cleanup_pairs(txn: &mut Txn<'_>, r: &Replica, now: u64) -> Result<(), StoreError> {
    let op = PairOp::Delete {
        delete_target: true,
    };
    let mut job = NewJob {
        id: format!("{}.cleanup", r.uid),
        job_type: JOB_CLEANUP.to_string(),
        project: r.project.clone(),
        entities: BTreeMap::from([
            ("vm_id".to_string(), r.vm_id.clone()),
            ("repname".to_string(), r.repname.clone()),
        ]),
        tasks: Vec::new(),
        sub_jobs: Vec::new(),
    };
    let mut ops = Vec::new();
    for id in &r.pair_ids {
        if let Some(p) = replication::load_pair(txn, id)? {
            if replication::check_op(&p, &op).is_ok() {
                replication::plan_op(&p, &op, &mut job, &[]);
                ops.push(p.id.clone());
            }
        }
    }
    if ops.is_empty() || !matches!(jobs::check_new_job(txn, &job)?, Ok(())) {
        return Ok(());
    }
    for id in &ops {
        let _ = replication::begin_op(txn, id, &op, &job.id, now)?;
    }
    let staged = jobs::insert_job(txn, &job, None, now)?;
    jobs::finish_if_empty(txn, &staged.id, now)
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

impl Store {
    pub fn danube_replica(
        &self,
        vm_id: &str,
        repname: &str,
    ) -> Result<Option<Replica>, StoreError> {
        self.get_record(CF_DANUBE, &replica_key(vm_id, repname))
    }

    /// A VM's replicas, by repname.
    pub fn danube_replicas(&self, vm_id: &str) -> Result<Vec<Replica>, StoreError> {
        Ok(self
            .scan_prefix::<Replica>(CF_DANUBE, &replica_prefix(vm_id))?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    pub fn danube_task(&self, id: &str) -> Result<Option<DanubeTask>, StoreError> {
        self.get_record(CF_DANUBE, &task_key(id))
    }

    pub fn danube_vm_state(&self, vm_id: &str) -> Result<Option<VmState>, StoreError> {
        self.get_record(CF_DANUBE, &vm_key(vm_id))
    }

    /// Unfinished Danube tasks of a VM (`None`: of every VM), as (vm id, task id).
    pub fn danube_pending_tasks(
        &self,
        vm_id: Option<&str>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut prefix = b"p/".to_vec();
        if let Some(v) = vm_id {
            prefix.extend_from_slice(v.as_bytes());
            prefix.push(0);
        }
        let mut out = Vec::new();
        for key in self.scan_keys(CF_DANUBE_INDEX, &prefix, usize::MAX)? {
            let rest = &key[2..];
            if let Some(pos) = rest.iter().position(|b| *b == 0) {
                out.push((
                    String::from_utf8_lossy(&rest[..pos]).into_owned(),
                    String::from_utf8_lossy(&rest[pos + 1..]).into_owned(),
                ));
            }
        }
        Ok(out)
    }

    /// The oldest `last_sync` over the replica's pairs (None until every disk synced once).
    pub fn danube_last_sync(&self, r: &Replica) -> Result<Option<u64>, StoreError> {
        let mut out: Option<u64> = None;
        for id in &r.pair_ids {
            match self.get_pair(id)?.and_then(|p| p.last_sync_ms) {
                Some(t) => out = Some(out.map_or(t, |o| o.min(t))),
                None => return Ok(None),
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
    use crate::inventory::{Disk, Flavor, HostState, InventoryCommand, Workload};
    use crate::jobs::testkit::Fixture;
    use crate::jobs::{JobsCommand, TaskOutcome, TaskStatus};

    const P: &str = "proj1";
    const MIB: u64 = 1 << 20;

    fn setup() -> Fixture {
        let fx = Fixture::new();
        fx.site("s1");
        fx.site("s2");
        fx.host("h1", "s1");
        fx.host("h2", "s2");
        fx.host("h3", "s2");
        let server = Server {
            id: "vm-1".into(),
            project: P.into(),
            name: "web01".into(),
            host: "h1".into(),
            status: ServerStatus::Active,
            flavor: Flavor {
                vcpus: 2,
                ram_mb: 2048,
            },
            disks: vec![
                Disk {
                    id: "vm-1-root".into(),
                    size_bytes: 16 * MIB,
                    pool: "p1".into(),
                    path: String::new(),
                },
                Disk {
                    id: "vm-1-data".into(),
                    size_bytes: 8 * MIB,
                    pool: "p1".into(),
                    path: String::new(),
                },
            ],
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        fx.inv(InventoryCommand::RegisterWorkloads {
            workloads: vec![Workload::Server(server)],
        })
        .expect("register vm");
        fx
    }

    fn info(id: &str) -> TaskInfo {
        TaskInfo {
            job_id: id.into(),
            user_id: "u1".into(),
            user_name: "olga".into(),
            hostname: "web01".into(),
            params_json: "{}".into(),
        }
    }

    fn create_cmd(id: &str, node: &str, reserve: bool) -> Command {
        Command::Danube(DanubeCommand::CreateReplica(Box::new(CreateReplica {
            task: info(id),
            project: P.into(),
            vm_id: "vm-1".into(),
            repname: "rep1".into(),
            node: node.into(),
            root_zpool: None,
            disk_zpools: BTreeMap::new(),
            reserve_resources: reserve,
            sleep_time: 60,
            enabled: true,
            bwlimit: None,
        })))
    }

    fn op(kind: &str, id: &str, force: bool) -> Command {
        let (task, project, vm_id, repname) = (
            info(id),
            P.to_string(),
            "vm-1".to_string(),
            "rep1".to_string(),
        );
        Command::Danube(match kind {
            "delete" => DanubeCommand::DeleteReplica {
                task,
                project,
                vm_id,
                repname,
            },
            "failover" => DanubeCommand::FailoverReplica {
                task,
                project,
                vm_id,
                repname,
                force,
            },
            "reinit" => DanubeCommand::ReinitReplica {
                task,
                project,
                vm_id,
                repname,
            },
            _ => unreachable!(),
        })
    }

    fn started(r: CommandResult) -> Job {
        match r {
            Ok(Outcome::Danube(o)) => match *o {
                DanubeOutcome::Task(j) => j,
                other => panic!("expected a task, got {other:?}"),
            },
            other => panic!("expected a task, got {other:?}"),
        }
    }

    /// Runs every task of the job on its placement host until the job ends.
    fn run_job(fx: &Fixture, id: &str) -> Job {
        for _ in 0..50 {
            let job = fx.job(id);
            if job.status.is_terminal() {
                return job;
            }
            for t in fx.store.job_tasks(id).expect("tasks") {
                if t.status == TaskStatus::Ready {
                    let host = t.placement_host.clone().unwrap_or_else(|| "h1".into());
                    let token = fx.assign_ok(&t.id, &host, 1);
                    let mut output = BTreeMap::new();
                    if matches!(t.kind, TaskKind::Sync { .. }) {
                        output.insert("bytes_sent".to_string(), "4096".to_string());
                    }
                    fx.jobs(JobsCommand::ReportResult {
                        task_id: t.id.clone(),
                        token,
                        outcome: TaskOutcome::Succeeded { output },
                    })
                    .expect("report");
                }
            }
        }
        panic!("job {id} did not end")
    }

    fn replica(fx: &Fixture) -> Option<Replica> {
        fx.store.danube_replica("vm-1", "rep1").expect("read")
    }

    fn kinds(fx: &Fixture, job: &str) -> Vec<String> {
        fx.store
            .job_tasks(job)
            .expect("tasks")
            .iter()
            .map(|t| match &t.kind {
                TaskKind::Workload { action, host, .. } => format!("{}@{host}", action.name()),
                k => format!("{}@{}", k.name(), k.natural_host().unwrap_or("-")),
            })
            .collect()
    }

    // DANUBE-REP-CREATE: one job, CreateTarget + full Sync per disk, the master's vCPUs
    // and RAM reserved on the node, the disks' bytes for the job's duration.
    #[test]
    fn create_replicates_every_disk_and_reserves() {
        let fx = setup();
        let job = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", true)));
        assert_eq!(job.job_type, JOB_CREATE);
        assert_eq!(
            kinds(&fx, &job.id),
            vec!["create_target@h2", "sync@h2", "create_target@h2", "sync@h2"]
        );
        let r = replica(&fx).expect("replica");
        assert_eq!(r.state, ReplicaState::Creating);
        assert_eq!(r.pair_ids.len(), 2);
        let h2 = fx.store.get_host("h2").expect("read").expect("h2");
        assert_eq!(h2.reservations[&r.holder()].resources.vcpus, 2);
        assert_eq!(
            h2.reservations[&job.id].resources.pool_bytes["p1"],
            24 * MIB
        );
        // While the creation runs the VM has a pending task.
        assert_eq!(
            fx.store
                .danube_pending_tasks(Some("vm-1"))
                .expect("pending"),
            vec![("vm-1".to_string(), job.id.clone())]
        );
        let done = run_job(&fx, &job.id);
        assert_eq!(done.status, JobStatus::Success);
        let r = replica(&fx).expect("replica");
        assert_eq!(r.state, ReplicaState::Ready);
        assert!(fx.store.danube_last_sync(&r).expect("read").is_some());
        let h2 = fx.store.get_host("h2").expect("read").expect("h2");
        assert!(h2.reservations.contains_key(&r.holder()));
        assert!(
            !h2.reservations.contains_key(&job.id),
            "storage hold ends with the job"
        );
        let t = fx.store.danube_task(&job.id).expect("read").expect("task");
        let res = t.result.expect("result");
        assert_eq!(res.message, "Server replica was successfully initialized");
        assert!(res.replica.expect("fields").last_sync_ms.is_some());
        for id in &r.pair_ids {
            let p = fx.store.get_pair(id).expect("read").expect("pair");
            assert_eq!(p.state, PairState::Active);
            assert!(p.enabled);
        }
        assert!(fx
            .store
            .danube_pending_tasks(None)
            .expect("pending")
            .is_empty());
    }

    #[test]
    fn create_refusals() {
        let fx = setup();
        let refused = |c: Command| fx.apply(c).expect_err("refused");
        // Unknown VM, another project's VM: the same not-found.
        let mut c = create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", true);
        if let Command::Danube(DanubeCommand::CreateReplica(b)) = &mut c {
            b.project = "other".into();
        }
        assert!(matches!(refused(c), CommandError::NotFound { kind, .. } if kind == KIND_VM));
        assert!(matches!(
            refused(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h1", true)),
            CommandError::Invalid { field, .. } if field == "node"
        ));
        assert!(matches!(
            refused(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "nope", true)),
            CommandError::Invalid { field, .. } if field == "node"
        ));
        fx.inv(InventoryCommand::MarkHostOffline {
            name: "h3".into(),
            if_no_heartbeat_since_ms: None,
        })
        .expect("offline");
        assert_eq!(
            refused(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h3", true)),
            CommandError::Conflict(ERR_NODE_NOT_OPERATIONAL.into())
        );
        started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", true)));
        assert!(matches!(
            refused(create_cmd("1e1d1-aaaaaaaa-0000-0000-0002", "h2", true)),
            CommandError::AlreadyExists { kind, .. } if kind == KIND_REPLICA
        ));
        let mut c = create_cmd("1e1d1-aaaaaaaa-0000-0000-0003", "h2", true);
        if let Command::Danube(DanubeCommand::CreateReplica(b)) = &mut c {
            b.repname = "rep2".into();
        }
        assert!(matches!(
            refused(c),
            CommandError::Invalid { field, reason } if field == "non_field_errors" && reason == ERR_LIMIT_REACHED
        ));
        // Nothing was left behind by the refusals.
        assert_eq!(fx.store.danube_replicas("vm-1").expect("read").len(), 1);
    }

    #[test]
    fn insufficient_resources_are_reported_under_node() {
        let fx = setup();
        fx.inv(InventoryCommand::Reserve {
            host: "h2".into(),
            holder: "someone".into(),
            resources: ResourceAmount {
                vcpus: 7,
                ram_mb: 0,
                pool_bytes: BTreeMap::new(),
            },
        })
        .expect("reserve");
        let e = fx
            .apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", true))
            .expect_err("short");
        assert!(
            matches!(&e, CommandError::Invalid { field, .. } if field == "node"),
            "{e:?}"
        );
        // Without the reservation it fits (CPU/RAM must be free only at failover).
        started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", false)));
    }

    // DANUBE-REP-FAILOVER, DANUBE-REP-REINIT, DANUBE-REP-DELETE: the whole life.
    #[test]
    fn failover_reinit_and_delete() {
        let mut fx = setup();
        let c = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", true)));
        run_job(&fx, &c.id);
        fx.now += 1000;
        let f = started(fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0002", false)));
        // Master reachable: planned (final sync, fence, promote), the master stopped
        // first and the slave started after (the master ran).
        assert_eq!(
            kinds(&fx, &f.id),
            vec![
                "stop@h1",
                "sync@h2",
                "fence@h1",
                "promote@h2",
                "sync@h2",
                "fence@h1",
                "promote@h2",
                "start@h2"
            ]
        );
        assert_eq!(
            fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0003", false)),
            Err(CommandError::Conflict(ERR_PENDING_TASKS.into()))
        );
        assert_eq!(run_job(&fx, &f.id).status, JobStatus::Success);
        let r = replica(&fx).expect("replica");
        assert!(r.reinit_required);
        assert!(!r.enabled);
        assert_eq!((r.node.as_str(), r.master_node.as_str()), ("h1", "h2"));
        let vm = fx
            .store
            .danube_vm_state("vm-1")
            .expect("read")
            .expect("overlay");
        assert_eq!(vm.node, "h2");
        assert!(vm.running);
        assert!(vm.disks.iter().all(|d| d.host == "h2"));
        let t = fx.store.danube_task(&f.id).expect("read").expect("task");
        assert_eq!(
            t.result.expect("result").message,
            "Server replica was successfully promoted to master"
        );
        assert_eq!(
            fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0004", false)),
            Err(CommandError::Conflict(ERR_REINIT_REQUIRED.into()))
        );
        // Reinit: the old master is stopped, fenced and receives the delta.
        let ri = started(fx.apply(op("reinit", "1e1d1-aaaaaaaa-0000-0000-0005", false)));
        assert_eq!(
            kinds(&fx, &ri.id),
            vec!["stop@h1", "fence@h1", "sync@h2", "fence@h1", "sync@h2"]
                .into_iter()
                .map(|k| k.replace("sync@h2", "sync@h1"))
                .collect::<Vec<_>>()
        );
        for t in fx.store.job_tasks(&ri.id).expect("tasks") {
            if let TaskKind::Sync { full, source, .. } = &t.kind {
                assert!(!full, "reinit sends only the delta");
                assert_eq!(source.host, "h2");
            }
        }
        assert_eq!(run_job(&fx, &ri.id).status, JobStatus::Success);
        let r = replica(&fx).expect("replica");
        assert!(!r.reinit_required);
        assert!(r.enabled);
        for id in &r.pair_ids {
            let p = fx.store.get_pair(id).expect("read").expect("pair");
            assert_eq!(p.state, PairState::Active);
            assert!(p.enabled);
        }
        assert_eq!(
            fx.apply(op("reinit", "1e1d1-aaaaaaaa-0000-0000-0006", false)),
            Err(CommandError::Conflict(ERR_REINIT_NOT_REQUIRED.into()))
        );
        // Delete: the slave (now on h1) goes, and the reservation with it.
        let d = started(fx.apply(op("delete", "1e1d1-aaaaaaaa-0000-0000-0007", false)));
        assert_eq!(
            kinds(&fx, &d.id),
            vec!["delete_volume@h1", "delete_volume@h1"]
        );
        assert_eq!(run_job(&fx, &d.id).status, JobStatus::Success);
        assert!(replica(&fx).is_none());
        for id in &r.pair_ids {
            assert!(fx.store.get_pair(id).expect("read").is_none());
        }
        // The slave's reservation is gone; the VM still runs on h2 and is counted there.
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), vm_holder("vm-1"), 2, 2048)]
        );
        let t = fx.store.danube_task(&d.id).expect("read").expect("task");
        let res = t.result.expect("result");
        assert_eq!(res.message, "Server replica was successfully destroyed");
        assert_eq!(res.replica.expect("fields").enabled, None);
    }

    /// Every Danube reservation, as (host, holder, vCPUs, RAM), sorted.
    fn held(fx: &Fixture) -> Vec<(String, String, u32, u64)> {
        let mut out = Vec::new();
        for h in fx.store.list_hosts().expect("hosts") {
            for (holder, r) in &h.reservations {
                if holder.starts_with("danube") {
                    out.push((
                        h.name.clone(),
                        holder.clone(),
                        r.resources.vcpus,
                        r.resources.ram_mb,
                    ));
                }
            }
        }
        out.sort();
        out
    }

    fn free_vcpus(fx: &Fixture, host: &str) -> u32 {
        fx.store
            .get_host(host)
            .expect("read")
            .expect("host")
            .available()
            .vcpus
    }

    // Reservations follow the truth: after a failover the VM is counted where it runs and
    // the replica's reservation follows the replica; a delete right after the failover
    // (no reinit) releases only what the replica held.
    #[test]
    fn reservations_follow_failover_and_delete_releases_what_is_held() {
        let fx = setup();
        let (h1_free, h2_free) = (free_vcpus(&fx, "h1"), free_vcpus(&fx, "h2"));
        let c = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", true)));
        run_job(&fx, &c.id);
        let uid = c.id.clone();
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), holder_of(&uid), 2, 2048)]
        );
        assert_eq!(free_vcpus(&fx, "h2"), h2_free - 2);
        let f = started(fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0002", false)));
        assert_eq!(run_job(&fx, &f.id).status, JobStatus::Success);
        // The VM runs on h2 now; the replica (the old master) is on h1, the VM's registered
        // host, where the inventory's allocation counts it: one VM's worth on each node.
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), vm_holder("vm-1"), 2, 2048)]
        );
        assert_eq!(free_vcpus(&fx, "h1"), h1_free);
        assert_eq!(free_vcpus(&fx, "h2"), h2_free - 2);
        // Delete right after the failover: the VM keeps its vCPUs on h2.
        let d = started(fx.apply(op("delete", "1e1d1-aaaaaaaa-0000-0000-0003", false)));
        assert_eq!(run_job(&fx, &d.id).status, JobStatus::Success);
        assert!(replica(&fx).is_none());
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), vm_holder("vm-1"), 2, 2048)]
        );
        assert_eq!(
            free_vcpus(&fx, "h2"),
            h2_free - 2,
            "the running VM still counts"
        );
        // A new replica of the moved VM on h3 reserves there; failing over to it moves the
        // VM's charge from h2 to h3 and the replica's reservation to h2.
        let c2 = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0004", "h3", true)));
        assert_eq!(run_job(&fx, &c2.id).status, JobStatus::Success);
        assert_eq!(
            held(&fx),
            vec![
                ("h2".to_string(), vm_holder("vm-1"), 2, 2048),
                ("h3".to_string(), holder_of(&c2.id), 2, 2048),
            ]
        );
        let f2 = started(fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0005", true)));
        assert_eq!(run_job(&fx, &f2.id).status, JobStatus::Success);
        assert_eq!(
            held(&fx),
            vec![
                ("h2".to_string(), holder_of(&c2.id), 2, 2048),
                ("h3".to_string(), vm_holder("vm-1"), 2, 2048),
            ]
        );
        let d2 = started(fx.apply(op("delete", "1e1d1-aaaaaaaa-0000-0000-0006", false)));
        assert_eq!(run_job(&fx, &d2.id).status, JobStatus::Success);
        assert_eq!(
            held(&fx),
            vec![("h3".to_string(), vm_holder("vm-1"), 2, 2048)]
        );
        assert_eq!(free_vcpus(&fx, "h2"), h2_free);
    }

    // Back to the registered host: nothing extra there; the replica reserves on its node
    // only with reserve_resources.
    #[test]
    fn failover_back_and_without_reservation() {
        let fx = setup();
        let c = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", false)));
        run_job(&fx, &c.id);
        assert_eq!(held(&fx), vec![]);
        let f = started(fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0002", false)));
        // The room for the promoted VM is held while the failover runs.
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), holder_of(&c.id), 2, 2048)]
        );
        assert_eq!(run_job(&fx, &f.id).status, JobStatus::Success);
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), vm_holder("vm-1"), 2, 2048)]
        );
        let ri = started(fx.apply(op("reinit", "1e1d1-aaaaaaaa-0000-0000-0003", false)));
        assert_eq!(run_job(&fx, &ri.id).status, JobStatus::Success);
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), vm_holder("vm-1"), 2, 2048)]
        );
        // Failover back to h1 (registered): the VM's charge on h2 ends; the replica on h2
        // reserves nothing (reserve_resources=false).
        let f2 = started(fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0004", false)));
        assert_eq!(run_job(&fx, &f2.id).status, JobStatus::Success);
        let vm = fx.store.danube_vm_state("vm-1").expect("read").expect("vm");
        assert_eq!(vm.node, "h1");
        assert_eq!(held(&fx), vec![]);
        // After a reinit, reserve_resources=true reserves on the replica's node (h2).
        let ri2 = started(fx.apply(op("reinit", "1e1d1-aaaaaaaa-0000-0000-0005", false)));
        assert_eq!(run_job(&fx, &ri2.id).status, JobStatus::Success);
        fx.apply(Command::Danube(DanubeCommand::UpdateReplica {
            task: info("1e1d1-aaaaaaaa-0000-0000-0006"),
            project: P.into(),
            vm_id: "vm-1".into(),
            repname: "rep1".into(),
            reserve_resources: Some(true),
            sleep_time: None,
            enabled: None,
            bwlimit: None,
        }))
        .expect("update");
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), holder_of(&c.id), 2, 2048)]
        );
    }

    // DANUBE-TASK-CANCEL of a failover: the room held for it is released, nothing moves.
    #[test]
    fn revoked_failover_releases_the_room_it_held() {
        let fx = setup();
        let c = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", false)));
        run_job(&fx, &c.id);
        let f = started(fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0002", false)));
        assert_eq!(
            held(&fx),
            vec![("h2".to_string(), holder_of(&c.id), 2, 2048)]
        );
        fx.jobs(JobsCommand::CancelJob {
            job_id: f.id.clone(),
            by: "user 'olga'".into(),
        })
        .expect("cancel");
        assert_eq!(held(&fx), vec![]);
        assert!(fx.store.danube_vm_state("vm-1").expect("read").is_none());
        assert!(!replica(&fx).expect("replica").reinit_required);
    }

    #[test]
    fn unplanned_failover_when_the_master_node_is_down() {
        let fx = setup();
        let c = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", false)));
        run_job(&fx, &c.id);
        fx.inv(InventoryCommand::MarkHostOffline {
            name: "h1".into(),
            if_no_heartbeat_since_ms: None,
        })
        .expect("offline");
        let f = started(fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0002", false)));
        assert_eq!(
            kinds(&fx, &f.id),
            vec!["promote@h2", "promote@h2", "start@h2"]
        );
        // reserve_resources=false: CPU/RAM are reserved at failover.
        let h2 = fx.store.get_host("h2").expect("read").expect("h2");
        assert!(h2.reservations.contains_key(&holder_of(&c.id)));
        assert_eq!(run_job(&fx, &f.id).status, JobStatus::Success);
        // Reinit needs the old master's node back.
        assert_eq!(
            fx.apply(op("reinit", "1e1d1-aaaaaaaa-0000-0000-0003", false)),
            Err(CommandError::Conflict(ERR_NODE_NOT_OPERATIONAL.into()))
        );
        fx.inv(InventoryCommand::RegisterHost(Box::new(
            crate::jobs::testkit::registration("h1", "s1"),
        )))
        .expect("back");
        let h1 = fx.store.get_host("h1").expect("read").expect("h1");
        assert_eq!(h1.state, HostState::Online);
        let ri = started(fx.apply(op("reinit", "1e1d1-aaaaaaaa-0000-0000-0004", false)));
        assert_eq!(run_job(&fx, &ri.id).status, JobStatus::Success);
    }

    #[test]
    fn failover_needs_free_resources_without_a_reservation() {
        let fx = setup();
        let c = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", false)));
        run_job(&fx, &c.id);
        fx.inv(InventoryCommand::Reserve {
            host: "h2".into(),
            holder: "someone".into(),
            resources: ResourceAmount {
                vcpus: 8,
                ram_mb: 0,
                pool_bytes: BTreeMap::new(),
            },
        })
        .expect("reserve");
        assert_eq!(
            fx.apply(op("failover", "1e1d1-aaaaaaaa-0000-0000-0002", false)),
            Err(CommandError::Conflict(ERR_NOT_ENOUGH_RESOURCES.into()))
        );
    }

    // DANUBE-TASK-CANCEL of a creation: the record goes, a clean-up job deletes the pairs.
    #[test]
    fn revoked_create_cleans_up() {
        let fx = setup();
        let c = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", true)));
        let pairs = replica(&fx).expect("replica").pair_ids;
        fx.jobs(JobsCommand::CancelJob {
            job_id: c.id.clone(),
            by: "user 'olga'".into(),
        })
        .expect("cancel");
        assert!(replica(&fx).is_none());
        let h2 = fx.store.get_host("h2").expect("read").expect("h2");
        assert!(h2.reservations.is_empty(), "{:?}", h2.reservations);
        let cleanup = format!("{}.cleanup", c.id);
        assert_eq!(
            kinds(&fx, &cleanup),
            vec!["delete_volume@h2", "delete_volume@h2"]
        );
        assert_eq!(run_job(&fx, &cleanup).status, JobStatus::Success);
        for id in pairs {
            assert!(fx.store.get_pair(&id).expect("read").is_none());
        }
        let t = fx.store.danube_task(&c.id).expect("read").expect("task");
        assert_eq!(t.result.expect("result").returncode, 1);
        // The name is free again.
        started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0002", "h2", true)));
    }

    // DANUBE-REP-UPDATE: reserve_resources alone is synchronous; the rest is a task that
    // ends at once and changes the pairs.
    #[test]
    fn update_sync_and_async() {
        let fx = setup();
        let c = started(fx.apply(create_cmd("1e1d1-aaaaaaaa-0000-0000-0001", "h2", true)));
        run_job(&fx, &c.id);
        let upd = |id: &str, reserve: Option<bool>, enabled: Option<bool>| {
            fx.apply(Command::Danube(DanubeCommand::UpdateReplica {
                task: info(id),
                project: P.into(),
                vm_id: "vm-1".into(),
                repname: "rep1".into(),
                reserve_resources: reserve,
                sleep_time: if enabled.is_some() { Some(0) } else { None },
                enabled,
                bwlimit: if enabled.is_some() {
                    Some(Some(1000))
                } else {
                    None
                },
            }))
        };
        match upd("1e1d1-aaaaaaaa-0000-0000-0002", Some(false), None) {
            Ok(Outcome::Danube(o)) => match *o {
                DanubeOutcome::Replica(r) => assert!(!r.reserve_resources),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        let h2 = fx.store.get_host("h2").expect("read").expect("h2");
        assert!(h2.reservations.is_empty());
        let j = started(upd("1e1d1-aaaaaaaa-0000-0000-0003", None, Some(false)));
        assert_eq!(j.status, JobStatus::Success);
        let r = replica(&fx).expect("replica");
        assert!(!r.enabled);
        assert_eq!((r.sleep_time, r.bwlimit), (0, Some(1000)));
        for id in &r.pair_ids {
            let p = fx.store.get_pair(id).expect("read").expect("pair");
            assert!(!p.enabled);
            assert_eq!(p.sleep_time_s, 1);
            assert_eq!(p.bwlimit_bytes_per_sec, Some(1000));
            assert_eq!(p.next_sync_ms.filter(|_| p.enabled), None);
        }
        let t = fx.store.danube_task(&j.id).expect("read").expect("task");
        assert_eq!(
            t.result.expect("result").message,
            "Server replication service was successfully updated"
        );
        let j = started(upd("1e1d1-aaaaaaaa-0000-0000-0004", None, Some(true)));
        assert_eq!(j.status, JobStatus::Success);
        let p = fx
            .store
            .get_pair(&r.pair_ids[0])
            .expect("read")
            .expect("pair");
        assert!(p.enabled);
        assert_eq!(
            fx.store.due_pairs(fx.now, 10).expect("due").len(),
            2,
            "syncs resume at once"
        );
    }
}
