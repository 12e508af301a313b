//! OpenStack Manila shares and share replicas (endpoints `MANILA-*` of
//! `../shared/spec/manila.md`).
//!
//! The share itself is the inventory's [`Share`] (reported by its host's agent). This
//! module adds what Manila knows on top of it:
//!
//! - a [`ManilaShare`] record: the share's `replication_type` (what Manila reads from the
//!   share type's extra-spec). An administrator sets it through drplane's native API
//!   (`PUT /drplane/v1/manila/shares/{id}`, [`ManilaCommand::SetReplicationType`]); that
//!   also records the share's first replica, the **active** one, which is the inventory
//!   share's own volume on its host;
//! - [`Replica`] records: one per share instance, with its host (backend), pool,
//!   availability zone (the host's site), volume, `status` and, for a secondary, the
//!   replication pair that feeds it from the active replica.
//!
//! A secondary replica is a replication pair (`crate::replication`) from the active
//! replica's volume to a tree volume (named by the replica id) on a host of the requested
//! availability zone that holds no other copy of the share. Every operation runs as a job
//! (visible natively at `/drplane/v1/jobs`); Manila shows no job, only `status` and
//! `replica_state`:
//!
//! | operation | job (type) | tasks |
//! |---|---|---|
//! | create (`MANILA-SR-CREATE`) | `manilaCreateShareReplica` | CreateTarget → Sync(full) |
//! | promote B (`MANILA-SR-PROMOTE`) | `manilaPromoteShareReplica` | pair A→B: Sync → Fence(A) → Promote(B), then the pair goes on B→A; for every other replica C: its pair A→C is unlinked (kept data) and a pair B→C is created (CreateTarget is idempotent, the sync sends only what changed) after B's promotion |
//! | resync (`MANILA-SR-RESYNC`) | `manilaResyncShareReplica` | Sync; or, when the replica's link is broken or not from the current active replica, unlink it and create a new pair from the active replica |
//! | delete, force delete | `manilaDeleteShareReplica` | DeleteVolume of the replica's volume (force delete of a replica whose host is offline: none, its data is left) |
//!
//! `replica_state` is derived from the pair as the agents last reported it
//! ([`replica_state`]): `active` for the active replica; `error` when the pair is in error
//! or its last sync failed; `in_sync` when the pair is active and its recovery point is at
//! most `2 × sleep_time + 30 s` old ([`IN_SYNC_GRACE_MS`]); `out_of_sync` otherwise (being
//! created, never synced, linked to an old active replica, or lagging). An administrator's
//! `reset_replica_state` holds until the pair next changes.
//!
//! Column families: `manila` holds `share\0{share_id}` → [`ManilaShare`] and
//! `replica\0{id}` → [`Replica`]; `manila_index` holds `s\0{share_id}\0{replica_id}`,
//! `p\0{project}\0{replica_id}` and, while a job holds a replica, `j\0{job_id}\0{replica_id}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::decode;
use crate::command::{CommandResult, Outcome};
use crate::error::{CommandError, StoreError};
use crate::inventory::{
    self, validate_id, validate_project, Host, ResourceAmount, Share, CF_HOSTS, CF_HOSTS_BY_SITE,
    CF_SHARES,
};
use crate::jobs::{
    self, Job, JobStatus, NewJob, NewTask, TaskKind, VolumeLayout, VolumeRef, WorkloadAction,
};
use crate::replication::{self, NewPair, Pair, PairOp, PairState};
use crate::store::Store;
use crate::txn::Txn;

pub const CF_MANILA: &str = "manila";
pub const CF_MANILA_INDEX: &str = "manila_index";

pub const CFS: &[&str] = &[CF_MANILA, CF_MANILA_INDEX];

/// Seconds between periodic syncs of a replica's pair (Manila's replica update interval).
pub const REPLICA_SLEEP_TIME_S: u32 = 60;
/// A replica is `in_sync` while its recovery point is at most 2 × sleep time + this old.
pub const IN_SYNC_GRACE_MS: u64 = 30_000;
/// Metadata limits (microversion 2.95).
pub const METADATA_KEY_MAX: usize = 255;
pub const METADATA_VALUE_MAX: usize = 1023;
pub const METADATA_ITEMS_MAX: usize = 64;
/// Attempts of a delete-volume task without a pair.
const DELETE_TASK_ATTEMPTS: u32 = 5;

pub const JOB_TYPE_CREATE: &str = "manilaCreateShareReplica";
pub const JOB_TYPE_PROMOTE: &str = "manilaPromoteShareReplica";
pub const JOB_TYPE_RESYNC: &str = "manilaResyncShareReplica";
pub const JOB_TYPE_DELETE: &str = "manilaDeleteShareReplica";
pub const JOB_TYPE_UNLINK: &str = "manilaUnlinkShareReplica";

/// `CommandError::Invalid` with this field means "refused by policy" (HTTP 403).
pub const FIELD_POLICY: &str = "policy";

// ---------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------

/// A share type's `replication_type` extra-spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationType {
    /// All copies writable. No drplane backend supports it (replication is one way, from
    /// the active copy): a replica of such a share finds no valid host.
    Writable,
    /// Secondaries read-only, promotable.
    Readable,
    /// Secondaries inaccessible until promoted.
    Dr,
}

impl ReplicationType {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationType::Writable => "writable",
            ReplicationType::Readable => "readable",
            ReplicationType::Dr => "dr",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "writable" => Some(ReplicationType::Writable),
            "readable" => Some(ReplicationType::Readable),
            "dr" => Some(ReplicationType::Dr),
            _ => None,
        }
    }
}

/// A replica's `status` (manila.md §2.2). New values go at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaStatus {
    Creating,
    Available,
    Error,
    Deleting,
    ErrorDeleting,
    ReplicationChange,
    Migrating,
    MigratingTo,
    ServerMigrating,
}

impl ReplicaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaStatus::Creating => "creating",
            ReplicaStatus::Available => "available",
            ReplicaStatus::Error => "error",
            ReplicaStatus::Deleting => "deleting",
            ReplicaStatus::ErrorDeleting => "error_deleting",
            ReplicaStatus::ReplicationChange => "replication_change",
            ReplicaStatus::Migrating => "migrating",
            ReplicaStatus::MigratingTo => "migrating_to",
            ReplicaStatus::ServerMigrating => "server_migrating",
        }
    }

    /// The values `reset_status` accepts (MANILA-SR-RESET-STATUS).
    pub const RESETTABLE: &'static [ReplicaStatus] = &[
        ReplicaStatus::Creating,
        ReplicaStatus::Available,
        ReplicaStatus::Deleting,
        ReplicaStatus::Error,
        ReplicaStatus::ErrorDeleting,
        ReplicaStatus::Migrating,
        ReplicaStatus::MigratingTo,
        ReplicaStatus::ServerMigrating,
    ];

    pub fn parse_resettable(s: &str) -> Option<Self> {
        Self::RESETTABLE.iter().copied().find(|v| v.as_str() == s)
    }
}

/// A replica's `replica_state` (manila.md §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    Active,
    InSync,
    OutOfSync,
    Error,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Active => "active",
            ReplicaState::InSync => "in_sync",
            ReplicaState::OutOfSync => "out_of_sync",
            ReplicaState::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(ReplicaState::Active),
            "in_sync" => Some(ReplicaState::InSync),
            "out_of_sync" => Some(ReplicaState::OutOfSync),
            "error" => Some(ReplicaState::Error),
            _ => None,
        }
    }
}

/// What Manila knows of a share beyond the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManilaShare {
    pub share_id: String,
    pub project: String,
    pub replication_type: ReplicationType,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// The part a replica plays in the job that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaOp {
    Create,
    /// This replica is being promoted; `old_active` is demoted, `pair_id` (old active →
    /// this) goes on in the other direction.
    Promote {
        old_active: String,
        pair_id: String,
    },
    /// The active replica being demoted by another's promotion.
    Demote,
    /// Another replica's promotion re-points this one's pair at the new active replica.
    Repoint,
    Resync,
    Delete {
        force: bool,
    },
}

/// One copy of a share (a Manila share instance with a `replica_state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: String,
    pub share_id: String,
    pub project: String,
    /// The backend: the drplane host holding this copy.
    pub host: String,
    pub pool: String,
    /// The host's site.
    pub availability_zone: String,
    /// The agent's volume: the share id for the first replica, else the replica id.
    pub volume_id: String,
    /// The volume's path on its host when known (the inventory share's), else empty.
    pub path: String,
    pub size_bytes: u64,
    /// Id of the replica's (only) export location.
    pub export_id: String,
    pub status: ReplicaStatus,
    /// The active (primary, writable) replica of its share.
    pub active: bool,
    /// The pair from the active replica to this one (secondaries only).
    pub pair_id: Option<String>,
    /// Pairs made for this replica so far (new ones are `{id}.{n}`).
    pub pair_seq: u32,
    /// An administrator's `reset_replica_state`, and when it was set.
    pub state_override: Option<(ReplicaState, u64)>,
    pub busy_job: Option<String>,
    pub pending: Option<ReplicaOp>,
    pub last_error: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Replica {
    pub fn volume_ref(&self) -> VolumeRef {
        VolumeRef {
            host: self.host.clone(),
            pool: self.pool.clone(),
            volume_id: self.volume_id.clone(),
            path: self.path.clone(),
            size_bytes: self.size_bytes,
            layout: VolumeLayout::Tree,
        }
    }
}

/// `replica_state` of `r` at `now_ms`, from its pair as the agents last reported it (see
/// the module docs). `active_volume` is the share's active replica's volume id.
pub fn replica_state(
    r: &Replica,
    pair: Option<&Pair>,
    active_volume: Option<&str>,
    now_ms: u64,
) -> ReplicaState {
    if let Some((s, at)) = r.state_override {
        if pair.is_none_or(|p| p.updated_at_ms <= at) {
            return s;
        }
    }
    if r.active {
        return ReplicaState::Active;
    }
    let Some(p) = pair else {
        return ReplicaState::Error;
    };
    if active_volume.is_some_and(|v| p.source.volume_id != v) {
        return ReplicaState::OutOfSync;
    }
    match p.state {
        PairState::Error => ReplicaState::Error,
        PairState::Creating | PairState::FailedOver => ReplicaState::OutOfSync,
        PairState::Active => {
            if p.last_error.is_some() {
                return ReplicaState::Error;
            }
            let limit = u64::from(p.sleep_time_s) * 2000 + IN_SYNC_GRACE_MS;
            match p.recovery_point_ms {
                Some(rp) if now_ms.saturating_sub(rp) <= limit => ReplicaState::InSync,
                _ => ReplicaState::OutOfSync,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

/// A replica to create (MANILA-SR-CREATE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewReplica {
    pub id: String,
    pub share_id: String,
    /// A site; `None`: any site, preferring one without a copy of the share.
    pub availability_zone: Option<String>,
    /// `scheduler_hints.only_host` (admin): `host[@backend][#pool]`.
    pub only_host: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub export_id: String,
}

/// Commands of this family. Add new variants at the end only. `project` is the caller's
/// project: `None` for an administrator, who sees every project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManilaCommand {
    /// Set (or with `None` clear) a share's replication type; setting it the first time
    /// records the active replica (`active_replica_id`, `export_id`). -> `ManilaOutcome::Share`.
    SetReplicationType {
        share_id: String,
        replication_type: Option<ReplicationType>,
        active_replica_id: String,
        export_id: String,
    },
    /// MANILA-SR-CREATE. -> `ManilaOutcome::Replica`.
    CreateReplica {
        project: Option<String>,
        replica: Box<NewReplica>,
        job_id: String,
    },
    /// MANILA-SR-PROMOTE. `admin` may promote an out_of_sync or error replica.
    /// -> `ManilaOutcome::Replica` or `AlreadyActive`.
    Promote {
        project: Option<String>,
        replica_id: String,
        job_id: String,
        admin: bool,
    },
    /// MANILA-SR-RESYNC (admin). -> `ManilaOutcome::Replica` or `AlreadyActive`.
    Resync {
        project: Option<String>,
        replica_id: String,
        job_id: String,
    },
    /// MANILA-SR-RESET-STATUS (admin). -> `ManilaOutcome::Replica`.
    ResetStatus {
        project: Option<String>,
        replica_id: String,
        status: ReplicaStatus,
    },
    /// MANILA-SR-RESET-REPLICA-STATE (admin). -> `ManilaOutcome::Replica`.
    ResetReplicaState {
        project: Option<String>,
        replica_id: String,
        replica_state: ReplicaState,
    },
    /// MANILA-SR-DELETE, MANILA-SR-FORCE-DELETE (admin). -> `ManilaOutcome::Replica`.
    Delete {
        project: Option<String>,
        replica_id: String,
        job_id: String,
        force: bool,
    },
}

impl ManilaCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        let project = |p: &Option<String>| match p {
            Some(p) => validate_project(p),
            None => Ok(()),
        };
        match self {
            ManilaCommand::SetReplicationType {
                share_id,
                active_replica_id,
                export_id,
                ..
            } => {
                validate_id("share_id", share_id)?;
                validate_id("active_replica_id", active_replica_id)?;
                validate_id("export_id", export_id)
            }
            ManilaCommand::CreateReplica {
                project: p,
                replica,
                job_id,
            } => {
                project(p)?;
                validate_id("id", &replica.id)?;
                validate_id("share_id", &replica.share_id)?;
                validate_id("export_id", &replica.export_id)?;
                validate_id("job_id", job_id)?;
                if let Some(az) = &replica.availability_zone {
                    crate::command::validate_site_name(az).map_err(|_| {
                        CommandError::invalid(
                            "availability_zone",
                            format!("Availability zone '{az}' is not a valid name."),
                        )
                    })?;
                }
                if let Some(h) = &replica.only_host {
                    if h.is_empty() || h.len() > 255 {
                        return Err(CommandError::invalid(
                            "scheduler_hints.only_host",
                            "must be 1 to 255 characters",
                        ));
                    }
                }
                validate_metadata(&replica.metadata)
            }
            ManilaCommand::Promote {
                project: p,
                replica_id,
                job_id,
                ..
            }
            | ManilaCommand::Resync {
                project: p,
                replica_id,
                job_id,
            }
            | ManilaCommand::Delete {
                project: p,
                replica_id,
                job_id,
                ..
            } => {
                project(p)?;
                validate_id("replica_id", replica_id)?;
                validate_id("job_id", job_id)
            }
            ManilaCommand::ResetStatus {
                project: p,
                replica_id,
                ..
            }
            | ManilaCommand::ResetReplicaState {
                project: p,
                replica_id,
                ..
            } => {
                project(p)?;
                validate_id("replica_id", replica_id)
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ManilaCommand::SetReplicationType { .. } => "manila_set_replication_type",
            ManilaCommand::CreateReplica { .. } => "manila_create_replica",
            ManilaCommand::Promote { .. } => "manila_promote_replica",
            ManilaCommand::Resync { .. } => "manila_resync_replica",
            ManilaCommand::ResetStatus { .. } => "manila_reset_replica_status",
            ManilaCommand::ResetReplicaState { .. } => "manila_reset_replica_state",
            ManilaCommand::Delete { .. } => "manila_delete_replica",
        }
    }
}

/// Metadata of a replica (microversion 2.95): keys 1–255, values 1–1023 bytes.
pub fn validate_metadata(m: &BTreeMap<String, String>) -> Result<(), CommandError> {
    if m.len() > METADATA_ITEMS_MAX {
        return Err(CommandError::invalid(
            "metadata",
            format!("at most {METADATA_ITEMS_MAX} items"),
        ));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > METADATA_KEY_MAX {
            return Err(CommandError::invalid(
                "metadata",
                format!("metadata keys must be 1 to {METADATA_KEY_MAX} characters"),
            ));
        }
        if v.is_empty() || v.len() > METADATA_VALUE_MAX {
            return Err(CommandError::invalid(
                "metadata",
                format!("metadata values must be 1 to {METADATA_VALUE_MAX} characters"),
            ));
        }
    }
    Ok(())
}

/// What this family's commands produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManilaOutcome {
    /// The share's record after the command (`None`: its replication type was cleared).
    Share(Option<ManilaShare>),
    Replica(Replica),
    /// Promote or resync of the active replica: nothing to do (HTTP 200).
    AlreadyActive(Replica),
}

// ---------------------------------------------------------------------------------------
// Keys and storage
// ---------------------------------------------------------------------------------------

fn key2(a: &str, b: &str) -> Vec<u8> {
    let mut k = a.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn key3(a: &str, b: &str, c: &str) -> Vec<u8> {
    let mut k = key2(a, b);
    k.push(0);
    k.extend_from_slice(c.as_bytes());
    k
}

fn share_key(id: &str) -> Vec<u8> {
    key2("share", id)
}

fn replica_key(id: &str) -> Vec<u8> {
    key2("replica", id)
}

fn load_replica(txn: &Txn<'_>, id: &str) -> Result<Option<Replica>, StoreError> {
    txn.get_record(CF_MANILA, &replica_key(id))
}

fn load_mshare(txn: &Txn<'_>, id: &str) -> Result<Option<ManilaShare>, StoreError> {
    txn.get_record(CF_MANILA, &share_key(id))
}

fn save_replica(txn: &mut Txn<'_>, old: Option<&Replica>, r: &Replica) -> Result<(), StoreError> {
    if let Some(o) = old {
        unindex_replica(txn, o)?;
    }
    txn.put(CF_MANILA_INDEX, &key3("s", &r.share_id, &r.id), Vec::new())?;
    txn.put(CF_MANILA_INDEX, &key3("p", &r.project, &r.id), Vec::new())?;
    if let Some(j) = &r.busy_job {
        txn.put(CF_MANILA_INDEX, &key3("j", j, &r.id), Vec::new())?;
    }
    txn.put_record(CF_MANILA, &replica_key(&r.id), r)
}

fn unindex_replica(txn: &mut Txn<'_>, o: &Replica) -> Result<(), StoreError> {
    txn.delete(CF_MANILA_INDEX, &key3("s", &o.share_id, &o.id))?;
    txn.delete(CF_MANILA_INDEX, &key3("p", &o.project, &o.id))?;
    if let Some(j) = &o.busy_job {
        txn.delete(CF_MANILA_INDEX, &key3("j", j, &o.id))?;
    }
    Ok(())
}

fn remove_replica(txn: &mut Txn<'_>, r: &Replica) -> Result<(), StoreError> {
    unindex_replica(txn, r)?;
    txn.delete(CF_MANILA, &replica_key(&r.id))
}

fn replicas_of_share_txn(txn: &Txn<'_>, share_id: &str) -> Result<Vec<Replica>, StoreError> {
    let prefix = key3("s", share_id, "");
    let mut out = Vec::new();
    for (k, _) in txn.scan_prefix(CF_MANILA_INDEX, &prefix)? {
        let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if let Some(r) = load_replica(txn, &id)? {
            out.push(r);
        }
    }
    Ok(out)
}

fn replica_not_found(id: &str) -> CommandError {
    CommandError::NotFound {
        kind: "share replica".into(),
        id: id.to_string(),
    }
}

fn share_not_found(id: &str) -> CommandError {
    CommandError::NotFound {
        kind: "share".into(),
        id: id.to_string(),
    }
}

fn bad(field: &str, reason: impl Into<String>) -> CommandError {
    CommandError::invalid(field, reason)
}

/// A refusal of the replication module, as Manila's 400.
fn as_bad_request(e: CommandError) -> CommandError {
    match e {
        CommandError::Conflict(m) => bad("replica", m),
        other => other,
    }
}

fn visible(project: &Option<String>, owner: &str) -> bool {
    project.as_deref().is_none_or(|p| p == owner)
}

/// The replica if the caller may see it.
fn load_visible(
    txn: &Txn<'_>,
    project: &Option<String>,
    id: &str,
) -> Result<Result<Replica, CommandError>, StoreError> {
    Ok(match load_replica(txn, id)? {
        Some(r) if visible(project, &r.project) => Ok(r),
        _ => Err(replica_not_found(id)),
    })
}

/// What a plan needs of a pair that does not exist yet.
fn planned_pair(n: &NewPair) -> Pair {
    Pair {
        id: n.id.clone(),
        project: n.project.clone(),
        owner: n.owner.clone(),
        source: n.source.clone(),
        target: n.target.clone(),
        state: PairState::Creating,
        enabled: n.enabled,
        sleep_time_s: n.sleep_time_s,
        bwlimit_bytes_per_sec: n.bwlimit_bytes_per_sec,
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
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

/// The pair that feeds `target` from `source` (the replica's next pair id).
fn new_pair_for(source: &Replica, target: &Replica) -> NewPair {
    NewPair {
        id: format!("{}.{}", target.id, target.pair_seq + 1),
        project: target.project.clone(),
        owner: format!("manila/replica/{}", target.id),
        source: source.volume_ref(),
        target: target.volume_ref(),
        enabled: true,
        sleep_time_s: REPLICA_SLEEP_TIME_S,
        bwlimit_bytes_per_sec: None,
    }
}

fn new_job(id: &str, job_type: &str, r: &Replica) -> NewJob {
    NewJob {
        id: id.to_string(),
        job_type: job_type.to_string(),
        project: r.project.clone(),
        entities: BTreeMap::from([
            ("share_id".to_string(), r.share_id.clone()),
            ("share_replica_id".to_string(), r.id.clone()),
        ]),
        tasks: Vec::new(),
        sub_jobs: Vec::new(),
    }
}

fn active_of(replicas: &[Replica]) -> Option<&Replica> {
    replicas.iter().find(|r| r.active)
}

/// Checks that an old pair may be unlinked (removed, its target's data kept).
fn check_unlink(
    txn: &Txn<'_>,
    pair_id: &str,
    unlink_job: &str,
) -> Result<Result<bool, CommandError>, StoreError> {
    let Some(p) = replication::load_pair(txn, pair_id)? else {
        return Ok(Ok(false));
    };
    if let Err(e) = replication::check_op(
        &p,
        &PairOp::Delete {
            delete_target: false,
        },
    ) {
        return Ok(Err(as_bad_request(e)));
    }
    if jobs::load_job_txn(txn, unlink_job)?.is_some() {
        return Ok(Err(CommandError::AlreadyExists {
            kind: "job".into(),
            id: unlink_job.to_string(),
        }));
    }
    Ok(Ok(true))
}

/// Removes a pair at once (a job without tasks), keeping its target's data.
fn unlink(
    txn: &mut Txn<'_>,
    pair_id: &str,
    unlink_job: &str,
    now: u64,
) -> Result<Result<(), CommandError>, StoreError> {
    Ok(replication::operate(
        txn,
        pair_id,
        &PairOp::Delete {
            delete_target: false,
        },
        unlink_job,
        JOB_TYPE_UNLINK,
        now,
    )?
    .map(|_| ()))
}

// ---------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

fn outcome(o: ManilaOutcome) -> CommandResult {
    Ok(Outcome::Manila(Box::new(o)))
}

pub(crate) fn apply(
    txn: &mut Txn<'_>,
    cmd: &ManilaCommand,
    now: u64,
) -> Result<CommandResult, StoreError> {
    match cmd {
        ManilaCommand::SetReplicationType {
            share_id,
            replication_type,
            active_replica_id,
            export_id,
        } => set_replication_type(
            txn,
            share_id,
            *replication_type,
            active_replica_id,
            export_id,
            now,
        ),
        ManilaCommand::CreateReplica {
            project,
            replica,
            job_id,
        } => create_replica(txn, project, replica, job_id, now),
        ManilaCommand::Promote {
            project,
            replica_id,
            job_id,
            admin,
        } => promote(txn, project, replica_id, job_id, *admin, now),
        ManilaCommand::Resync {
            project,
            replica_id,
            job_id,
        } => resync(txn, project, replica_id, job_id, now),
        ManilaCommand::ResetStatus {
            project,
            replica_id,
            status,
        } => {
            let old = tri!(load_visible(txn, project, replica_id)?);
            let mut r = old.clone();
            r.status = *status;
            r.updated_at_ms = now;
            save_replica(txn, Some(&old), &r)?;
            Ok(outcome(ManilaOutcome::Replica(r)))
        }
        ManilaCommand::ResetReplicaState {
            project,
            replica_id,
            replica_state,
        } => {
            let old = tri!(load_visible(txn, project, replica_id)?);
            if old.active {
                return Ok(Err(bad(
                    "replica_state",
                    "Cannot reset replica_state of an active replica",
                )));
            }
            let mut r = old.clone();
            r.state_override = Some((*replica_state, now));
            r.updated_at_ms = now;
            save_replica(txn, Some(&old), &r)?;
            Ok(outcome(ManilaOutcome::Replica(r)))
        }
        ManilaCommand::Delete {
            project,
            replica_id,
            job_id,
            force,
        } => delete(txn, project, replica_id, job_id, *force, now),
    }
}

fn set_replication_type(
    txn: &mut Txn<'_>,
    share_id: &str,
    rt: Option<ReplicationType>,
    active_replica_id: &str,
    export_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let Some(share) = txn.get_record::<Share>(CF_SHARES, share_id.as_bytes())? else {
        return Ok(Err(share_not_found(share_id)));
    };
    let existing = load_mshare(txn, share_id)?;
    let replicas = replicas_of_share_txn(txn, share_id)?;
    match rt {
        None => {
            if replicas.iter().any(|r| !r.active) {
                return Ok(Err(CommandError::Conflict(format!(
                    "share '{share_id}' still has secondary replicas; delete them first"
                ))));
            }
            if let Some(r) = replicas.iter().find(|r| r.busy_job.is_some()) {
                return Ok(Err(CommandError::Conflict(format!(
                    "replica '{}' of share '{share_id}' is busy",
                    r.id
                ))));
            }
            for r in &replicas {
                remove_replica(txn, r)?;
            }
            txn.delete(CF_MANILA, &share_key(share_id))?;
            Ok(outcome(ManilaOutcome::Share(None)))
        }
        Some(t) => {
            let record = ManilaShare {
                share_id: share_id.to_string(),
                project: share.project.clone(),
                replication_type: t,
                created_at_ms: existing.as_ref().map_or(now, |e| e.created_at_ms),
                updated_at_ms: now,
            };
            if replicas.is_empty() {
                if load_replica(txn, active_replica_id)?.is_some() {
                    return Ok(Err(CommandError::AlreadyExists {
                        kind: "share replica".into(),
                        id: active_replica_id.to_string(),
                    }));
                }
                let az = inventory::host_txn(txn, &share.host)?
                    .map(|h| h.site)
                    .unwrap_or_default();
                let r = Replica {
                    id: active_replica_id.to_string(),
                    share_id: share_id.to_string(),
                    project: share.project.clone(),
                    host: share.host.clone(),
                    pool: share.pool.clone(),
                    availability_zone: az,
                    volume_id: share.id.clone(),
                    path: share.path.clone(),
                    size_bytes: share.size_bytes,
                    export_id: export_id.to_string(),
                    status: ReplicaStatus::Available,
                    active: true,
                    pair_id: None,
                    pair_seq: 0,
                    state_override: None,
                    busy_job: None,
                    pending: None,
                    last_error: None,
                    metadata: BTreeMap::new(),
                    created_at_ms: now,
                    updated_at_ms: now,
                };
                save_replica(txn, None, &r)?;
            }
            txn.put_record(CF_MANILA, &share_key(share_id), &record)?;
            Ok(outcome(ManilaOutcome::Share(Some(record))))
        }
    }
}

/// `host[@backend][#pool]` → (host, pool).
fn parse_only_host(s: &str) -> (&str, Option<&str>) {
    let (head, pool) = match s.split_once('#') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host = head.split_once('@').map_or(head, |(h, _)| h);
    (host, pool.filter(|p| !p.is_empty()))
}

/// A host and pool for a new replica of `size` bytes, or why there is none.
fn place(
    txn: &Txn<'_>,
    new: &NewReplica,
    replicas: &[Replica],
    active: &Replica,
    size: u64,
    job_id: &str,
) -> Result<Result<(Host, String), CommandError>, StoreError> {
    let mut hosts: Vec<Host> = Vec::new();
    match &new.availability_zone {
        Some(az) => {
            if txn.get(crate::store::CF_SITES, az.as_bytes())?.is_none() {
                return Ok(Err(bad(
                    "availability_zone",
                    format!("Availability zone '{az}' not found."),
                )));
            }
            let prefix = key2(az, "");
            for (k, _) in txn.scan_prefix(CF_HOSTS_BY_SITE, &prefix)? {
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(h) = inventory::host_txn(txn, &name)? {
                    hosts.push(h);
                }
            }
        }
        None => {
            for (_, v) in txn.scan_prefix(CF_HOSTS, b"")? {
                hosts.push(decode::<Host>(&v)?);
            }
        }
    }
    let (only_host, only_pool) = match &new.only_host {
        Some(s) => {
            let (h, p) = parse_only_host(s);
            (Some(h), p)
        }
        None => (None, None),
    };
    let mut best: Option<(bool, u64, Host, String)> = None;
    let mut why = Vec::new();
    for h in hosts {
        if only_host.is_some_and(|o| o != h.name) {
            continue;
        }
        if replicas.iter().any(|r| r.host == h.name) {
            why.push(format!("'{}' already holds a copy", h.name));
            continue;
        }
        if !h.is_online() {
            why.push(format!("'{}' is offline", h.name));
            continue;
        }
        let mut placed = None;
        for p in &h.capacity.pools {
            if only_pool.is_some_and(|o| o != p.name) {
                continue;
            }
            let req = ResourceAmount {
                vcpus: 0,
                ram_mb: 0,
                pool_bytes: BTreeMap::from([(p.name.clone(), size)]),
            };
            if inventory::check_reserve(txn, &h.name, job_id, &req)?.is_ok() {
                let free = h
                    .available_excluding(Some(job_id))
                    .pool_bytes
                    .get(&p.name)
                    .copied()
                    .unwrap_or(0);
                if placed.as_ref().is_none_or(|(f, _)| free > *f) {
                    placed = Some((free, p.name.clone()));
                }
            }
        }
        let Some((free, pool)) = placed else {
            why.push(format!("'{}' has no pool with {size} bytes free", h.name));
            continue;
        };
        let other_site = h.site != active.availability_zone;
        let better = match &best {
            None => true,
            Some((bo, bf, bh, _)) => {
                (other_site, free, std::cmp::Reverse(&h.name))
                    > (*bo, *bf, std::cmp::Reverse(&bh.name))
            }
        };
        if better {
            best = Some((other_site, free, h, pool));
        }
    }
    match best {
        Some((_, _, h, pool)) => Ok(Ok((h, pool))),
        None => {
            let where_ = match &new.availability_zone {
                Some(az) => format!("in availability zone '{az}'"),
                None => "in any availability zone".to_string(),
            };
            let detail = if why.is_empty() {
                "no host there".to_string()
            } else {
                why.join("; ")
            };
            Ok(Err(bad(
                "availability_zone",
                format!(
                    "No valid host was found {where_} for a replica of share {}: {detail}.",
                    new.share_id
                ),
            )))
        }
    }
}

fn create_replica(
    txn: &mut Txn<'_>,
    project: &Option<String>,
    new: &NewReplica,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let share = match txn.get_record::<Share>(CF_SHARES, new.share_id.as_bytes())? {
        Some(s) if visible(project, &s.project) => s,
        _ => return Ok(Err(share_not_found(&new.share_id))),
    };
    let Some(ms) = load_mshare(txn, &share.id)? else {
        return Ok(Err(bad(
            "share_id",
            format!(
                "Share {} has no replication type: it is not replicable (an administrator sets one with PUT /drplane/v1/manila/shares/{}).",
                share.id, share.id
            ),
        )));
    };
    // The agents replicate one way, from the active copy: no backend can keep several
    // writable copies, so a `writable` share finds no host, as Manila answers when no
    // backend supports the share type's replication_type.
    if ms.replication_type == ReplicationType::Writable {
        return Ok(Err(bad(
            "share_id",
            format!(
                "No valid host was found for a replica of share {}: no backend supports \
                 replication_type 'writable' (the backends replicate one way: use 'dr' or \
                 'readable').",
                share.id
            ),
        )));
    }
    if load_replica(txn, &new.id)?.is_some() {
        return Ok(Err(CommandError::AlreadyExists {
            kind: "share replica".into(),
            id: new.id.clone(),
        }));
    }
    let replicas = replicas_of_share_txn(txn, &share.id)?;
    let Some(active) = active_of(&replicas)
        .filter(|a| a.status == ReplicaStatus::Available)
        .cloned()
    else {
        return Ok(Err(bad(
            "share_id",
            format!(
                "Share {} does not have any active replica in available state.",
                share.id
            ),
        )));
    };
    if let Some(r) = replicas
        .iter()
        .find(|r| matches!(r.pending, Some(ReplicaOp::Promote { .. })))
    {
        return Ok(Err(bad(
            "share_id",
            format!(
                "Share {} is busy: replica {} is being promoted.",
                share.id, r.id
            ),
        )));
    }
    let (host, pool) = tri!(place(
        txn,
        new,
        &replicas,
        &active,
        share.size_bytes,
        job_id
    )?);
    let mut replica = Replica {
        id: new.id.clone(),
        share_id: share.id.clone(),
        project: share.project.clone(),
        host: host.name.clone(),
        pool: pool.clone(),
        availability_zone: host.site.clone(),
        volume_id: new.id.clone(),
        path: String::new(),
        size_bytes: share.size_bytes,
        export_id: new.export_id.clone(),
        status: ReplicaStatus::Creating,
        active: false,
        pair_id: None,
        pair_seq: 0,
        state_override: None,
        busy_job: Some(job_id.to_string()),
        pending: Some(ReplicaOp::Create),
        last_error: None,
        metadata: new.metadata.clone(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    let np = new_pair_for(&active, &replica);
    tri!(replication::check_new_pair(txn, &np)?);
    let mut job = new_job(job_id, JOB_TYPE_CREATE, &replica);
    replication::plan_op(&planned_pair(&np), &PairOp::Create, &mut job, &[]);
    tri!(jobs::check_new_job(txn, &job)?);
    let req = ResourceAmount {
        vcpus: 0,
        ram_mb: 0,
        pool_bytes: BTreeMap::from([(pool, share.size_bytes)]),
    };
    let mut h = tri!(inventory::check_reserve(txn, &host.name, job_id, &req)?);
    // Everything checked: write.
    replication::insert_pair(txn, &np, job_id, now)?;
    jobs::insert_job(txn, &job, None, now)?;
    inventory::put_reservation(txn, &mut h, job_id, &req, now)?;
    replica.pair_id = Some(np.id.clone());
    replica.pair_seq += 1;
    save_replica(txn, None, &replica)?;
    Ok(outcome(ManilaOutcome::Replica(replica)))
}

fn promote(
    txn: &mut Txn<'_>,
    project: &Option<String>,
    replica_id: &str,
    job_id: &str,
    admin: bool,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let target = tri!(load_visible(txn, project, replica_id)?);
    if target.active {
        return Ok(outcome(ManilaOutcome::AlreadyActive(target)));
    }
    if target.status != ReplicaStatus::Available {
        return Ok(Err(bad(
            "status",
            format!(
                "Replica {} must be in available state to be promoted (it is {}).",
                target.id,
                target.status.as_str()
            ),
        )));
    }
    let replicas = replicas_of_share_txn(txn, &target.share_id)?;
    let Some(active) = active_of(&replicas).cloned() else {
        return Ok(Err(bad(
            "share_id",
            format!("Share {} has no active replica.", target.share_id),
        )));
    };
    if let Some(r) = replicas.iter().find(|r| r.busy_job.is_some()) {
        return Ok(Err(bad(
            "share_id",
            format!(
                "Share {} is busy: replica {} has an operation in progress ({}).",
                target.share_id,
                r.id,
                r.status.as_str()
            ),
        )));
    }
    let pair = match &target.pair_id {
        Some(pid) => replication::load_pair(txn, pid)?,
        None => None,
    };
    let state = replica_state(&target, pair.as_ref(), Some(&active.volume_id), now);
    if matches!(state, ReplicaState::OutOfSync | ReplicaState::Error) && !admin {
        return Ok(Err(bad(
            FIELD_POLICY,
            format!(
                "Only an administrator may promote replica {} whose replica_state is {}.",
                target.id,
                state.as_str()
            ),
        )));
    }
    let Some(pair) = pair.filter(|p| p.source.volume_id == active.volume_id) else {
        return Ok(Err(bad(
            "replica_state",
            format!(
                "Replica {} is not replicating from the active replica {}; resync it first.",
                target.id, active.id
            ),
        )));
    };
    let failover = PairOp::PlannedFailover {
        keep_replicating: true,
    };
    if let Err(e) = replication::check_op(&pair, &failover) {
        return Ok(Err(as_bad_request(e)));
    }
    // Every other secondary: unlink its pair from the old active replica and feed it from
    // the promoted one once that is promoted.
    let others: Vec<&Replica> = replicas
        .iter()
        .filter(|r| !r.active && r.id != target.id)
        .collect();
    let mut job = new_job(job_id, JOB_TYPE_PROMOTE, &target);
    let last = replication::plan_op(&pair, &failover, &mut job, &[]);
    let mut new_pairs = Vec::new();
    let mut unlinks = Vec::new();
    for (k, c) in others.iter().enumerate() {
        if let Some(old) = &c.pair_id {
            let uj = format!("{job_id}.unlink.{}", k + 1);
            if tri!(check_unlink(txn, old, &uj)?) {
                unlinks.push((old.clone(), uj));
            }
        }
        let np = new_pair_for(&target, c);
        tri!(replication::check_new_pair(txn, &np)?);
        replication::plan_op(&planned_pair(&np), &PairOp::Create, &mut job, &last);
        new_pairs.push((c.id.clone(), np));
    }
    tri!(jobs::check_new_job(txn, &job)?);
    // Everything checked: write.
    for (pid, uj) in &unlinks {
        tri!(unlink(txn, pid, uj, now)?);
    }
    tri!(replication::begin_op(
        txn, &pair.id, &failover, job_id, now
    )?);
    for (_, np) in &new_pairs {
        replication::insert_pair(txn, np, job_id, now)?;
    }
    jobs::insert_job(txn, &job, None, now)?;
    for (cid, np) in &new_pairs {
        if let Some(old) = load_replica(txn, cid)? {
            let mut c = old.clone();
            c.pair_id = Some(np.id.clone());
            c.pair_seq += 1;
            c.busy_job = Some(job_id.to_string());
            c.pending = Some(ReplicaOp::Repoint);
            c.updated_at_ms = now;
            save_replica(txn, Some(&old), &c)?;
        }
    }
    if let Some(old) = load_replica(txn, &active.id)? {
        let mut a = old.clone();
        a.busy_job = Some(job_id.to_string());
        a.pending = Some(ReplicaOp::Demote);
        a.updated_at_ms = now;
        save_replica(txn, Some(&old), &a)?;
    }
    let old = load_replica(txn, &target.id)?.unwrap_or(target);
    let mut t = old.clone();
    t.status = ReplicaStatus::ReplicationChange;
    t.busy_job = Some(job_id.to_string());
    t.pending = Some(ReplicaOp::Promote {
        old_active: active.id.clone(),
        pair_id: pair.id.clone(),
    });
    t.last_error = None;
    t.updated_at_ms = now;
    save_replica(txn, Some(&old), &t)?;
    Ok(outcome(ManilaOutcome::Replica(t)))
}

fn resync(
    txn: &mut Txn<'_>,
    project: &Option<String>,
    replica_id: &str,
    job_id: &str,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let target = tri!(load_visible(txn, project, replica_id)?);
    if target.active {
        return Ok(outcome(ManilaOutcome::AlreadyActive(target)));
    }
    if let Some(j) = &target.busy_job {
        return Ok(Err(bad(
            "replica",
            format!(
                "Replica {} is busy with another operation (job {j}).",
                target.id
            ),
        )));
    }
    let replicas = replicas_of_share_txn(txn, &target.share_id)?;
    let Some(active) = active_of(&replicas).cloned() else {
        return Ok(Err(bad(
            "share_id",
            format!("Share {} has no active replica.", target.share_id),
        )));
    };
    if active.busy_job.is_some() {
        return Ok(Err(bad(
            "share_id",
            format!(
                "Share {} is busy: its active replica is changing.",
                target.share_id
            ),
        )));
    }
    let pair = match &target.pair_id {
        Some(pid) => replication::load_pair(txn, pid)?,
        None => None,
    };
    let sync = PairOp::Sync {
        full: false,
        periodic: false,
    };
    let mut job = new_job(job_id, JOB_TYPE_RESYNC, &target);
    let healthy = pair.as_ref().filter(|p| {
        p.source.volume_id == active.volume_id && replication::check_op(p, &sync).is_ok()
    });
    let mut t = target.clone();
    match healthy {
        Some(p) => {
            replication::plan_op(p, &sync, &mut job, &[]);
            tri!(jobs::check_new_job(txn, &job)?);
            tri!(replication::begin_op(txn, &p.id, &sync, job_id, now)?);
            jobs::insert_job(txn, &job, None, now)?;
        }
        None => {
            // Re-create the link from the active replica (the volume is kept: CreateTarget
            // is idempotent and the sync sends only what differs).
            let uj = format!("{job_id}.unlink.1");
            let unlink_old = match &target.pair_id {
                Some(old) => tri!(check_unlink(txn, old, &uj)?),
                None => false,
            };
            let np = new_pair_for(&active, &target);
            tri!(replication::check_new_pair(txn, &np)?);
            replication::plan_op(&planned_pair(&np), &PairOp::Create, &mut job, &[]);
            tri!(jobs::check_new_job(txn, &job)?);
            if let (true, Some(old)) = (unlink_old, &target.pair_id) {
                tri!(unlink(txn, old, &uj, now)?);
            }
            replication::insert_pair(txn, &np, job_id, now)?;
            jobs::insert_job(txn, &job, None, now)?;
            t.pair_id = Some(np.id.clone());
            t.pair_seq += 1;
        }
    }
    let old = load_replica(txn, &target.id)?.unwrap_or(target);
    t.busy_job = Some(job_id.to_string());
    t.pending = Some(ReplicaOp::Resync);
    t.updated_at_ms = now;
    save_replica(txn, Some(&old), &t)?;
    Ok(outcome(ManilaOutcome::Replica(t)))
}

fn delete(
    txn: &mut Txn<'_>,
    project: &Option<String>,
    replica_id: &str,
    job_id: &str,
    force: bool,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let mut target = tri!(load_visible(txn, project, replica_id)?);
    if target.active {
        // Decision 5 of the spec: 409, whatever the number of replicas.
        return Ok(Err(CommandError::Conflict(format!(
            "Cannot delete the active replica {} of share {}: promote another replica first.",
            target.id, target.share_id
        ))));
    }
    if let Some(j) = target.busy_job.clone() {
        let own = matches!(
            target.pending,
            Some(ReplicaOp::Create | ReplicaOp::Resync | ReplicaOp::Delete { .. })
        );
        if !force || !own {
            return Ok(Err(bad(
                "replica",
                format!(
                    "Replica {} is busy ({}, job {j}); wait for it{}.",
                    target.id,
                    target.status.as_str(),
                    if force { "" } else { " or force-delete it" }
                ),
            )));
        }
    }
    if jobs::load_job_txn(txn, job_id)?.is_some() {
        return Ok(Err(CommandError::AlreadyExists {
            kind: "job".into(),
            id: job_id.to_string(),
        }));
    }
    if let Some(j) = target.busy_job.clone() {
        // Force delete preempts the replica's own create, resync or delete.
        jobs::cancel_job(
            txn,
            &j,
            &format!(
                "preempted by the force delete of share replica {}",
                target.id
            ),
            now,
        )?;
        target = tri!(load_visible(txn, project, replica_id)?);
    }
    let host_online = inventory::host_txn(txn, &target.host)?.is_some_and(|h| h.is_online());
    let delete_data = !force || host_online;
    let pair = match &target.pair_id {
        Some(pid) => replication::load_pair(txn, pid)?
            .filter(|p| p.target.volume_id == target.volume_id && p.target.host == target.host),
        None => None,
    };
    let mut job = new_job(job_id, JOB_TYPE_DELETE, &target);
    let op = PairOp::Delete {
        delete_target: delete_data,
    };
    match &pair {
        Some(p) => {
            if let Err(e) = replication::check_op(p, &op) {
                return Ok(Err(as_bad_request(e)));
            }
            replication::plan_op(p, &op, &mut job, &[]);
        }
        None if delete_data => job.tasks.push(NewTask {
            id: format!("{job_id}:delete"),
            kind: TaskKind::Workload {
                host: target.host.clone(),
                workload_kind: "share".into(),
                workload_id: target.share_id.clone(),
                action: WorkloadAction::DeleteVolume {
                    volume: target.volume_ref(),
                },
            },
            depends_on: Vec::new(),
            max_attempts: DELETE_TASK_ATTEMPTS,
            host: None,
        }),
        None => {}
    }
    tri!(jobs::check_new_job(txn, &job)?);
    if let Some(p) = &pair {
        tri!(replication::begin_op(txn, &p.id, &op, job_id, now)?);
    }
    let old = load_replica(txn, &target.id)?.unwrap_or_else(|| target.clone());
    let mut t = target;
    t.status = ReplicaStatus::Deleting;
    t.busy_job = Some(job_id.to_string());
    t.pending = Some(ReplicaOp::Delete { force });
    t.updated_at_ms = now;
    save_replica(txn, Some(&old), &t)?;
    jobs::insert_job(txn, &job, None, now)?;
    // A job without tasks (force delete on an offline host, or a pair without the target)
    // ends at once, and with it the replica.
    jobs::finish_if_empty(txn, job_id, now)?;
    let after = load_replica(txn, &t.id)?.unwrap_or(t);
    Ok(outcome(ManilaOutcome::Replica(after)))
}

/// Called whenever a job ends (SUCCESS or FAIL), after the pairs it held moved on:
/// settles the replicas the job held.
pub(crate) fn on_job_end(txn: &mut Txn<'_>, job: &Job, now: u64) -> Result<(), StoreError> {
    let prefix = key3("j", &job.id, "");
    let ok = job.status == JobStatus::Success;
    let reason = || {
        job.fail_reason
            .clone()
            .unwrap_or_else(|| "the job failed".to_string())
    };
    for (key, _) in txn.scan_prefix(CF_MANILA_INDEX, &prefix)? {
        let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        let Some(old) = load_replica(txn, &id)? else {
            txn.delete(CF_MANILA_INDEX, &key)?;
            continue;
        };
        if old.busy_job.as_deref() != Some(job.id.as_str()) {
            txn.delete(CF_MANILA_INDEX, &key)?;
            continue;
        }
        let mut r = old.clone();
        let op = r.pending.take();
        r.busy_job = None;
        r.updated_at_ms = now;
        match (op, ok) {
            (Some(ReplicaOp::Delete { .. }), true)
            | (Some(ReplicaOp::Delete { force: true }), false) => {
                remove_replica(txn, &old)?;
                continue;
            }
            (Some(ReplicaOp::Delete { .. }), false) => {
                r.status = ReplicaStatus::ErrorDeleting;
                r.last_error = Some(reason());
            }
            (Some(ReplicaOp::Create), true) => {
                r.status = ReplicaStatus::Available;
                r.last_error = None;
            }
            (
                Some(ReplicaOp::Promote {
                    old_active,
                    pair_id,
                }),
                true,
            ) => {
                // The pair now runs from this replica to the old active one.
                if let Some(a_old) = load_replica(txn, &old_active)? {
                    let mut a = a_old.clone();
                    a.active = false;
                    a.pair_id = Some(pair_id);
                    a.state_override = None;
                    a.updated_at_ms = now;
                    save_replica(txn, Some(&a_old), &a)?;
                }
                r.active = true;
                r.pair_id = None;
                r.state_override = None;
                r.status = ReplicaStatus::Available;
                r.last_error = None;
            }
            (Some(ReplicaOp::Resync), true) => {
                if r.status == ReplicaStatus::Error {
                    r.status = ReplicaStatus::Available;
                }
                r.last_error = None;
            }
            (Some(ReplicaOp::Demote | ReplicaOp::Repoint), true) | (None, _) => {}
            (Some(ReplicaOp::Create | ReplicaOp::Promote { .. }), false) => {
                r.status = ReplicaStatus::Error;
                r.last_error = Some(reason());
            }
            (Some(ReplicaOp::Resync | ReplicaOp::Demote | ReplicaOp::Repoint), false) => {
                r.last_error = Some(reason());
            }
        }
        save_replica(txn, Some(&old), &r)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

impl Store {
    /// A share's Manila record (its replication type), if it has one.
    pub fn get_manila_share(&self, share_id: &str) -> Result<Option<ManilaShare>, StoreError> {
        self.get_record(CF_MANILA, &share_key(share_id))
    }

    pub fn get_share_replica(&self, id: &str) -> Result<Option<Replica>, StoreError> {
        self.get_record(CF_MANILA, &replica_key(id))
    }

    fn replicas_by_index(&self, prefix: &[u8]) -> Result<Vec<Replica>, StoreError> {
        let mut out = Vec::new();
        for key in self.scan_keys(CF_MANILA_INDEX, prefix, usize::MAX)? {
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if let Some(r) = self.get_share_replica(&id)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The replicas of a share, by id.
    pub fn replicas_of_share(&self, share_id: &str) -> Result<Vec<Replica>, StoreError> {
        self.replicas_by_index(&key3("s", share_id, ""))
    }

    /// The replicas of a project, by id.
    pub fn replicas_of_project(&self, project: &str) -> Result<Vec<Replica>, StoreError> {
        self.replicas_by_index(&key3("p", project, ""))
    }

    /// Every replica, by id.
    pub fn list_share_replicas(&self) -> Result<Vec<Replica>, StoreError> {
        Ok(self
            .scan_prefix::<Replica>(CF_MANILA, &key2("replica", ""))?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::inventory::{InventoryCommand, ShareStatus, Workload};
    use crate::jobs::testkit::Fixture;
    use crate::jobs::{JobsCommand, TaskOutcome, TaskStatus};

    const P: &str = "proj1";

    fn setup() -> Fixture {
        let f = Fixture::new();
        for (s, h) in [("az1", "h1"), ("az2", "h2"), ("az3", "h3")] {
            f.site(s);
            f.host(h, s);
        }
        f.inv(InventoryCommand::RegisterWorkloads {
            workloads: vec![Workload::Share(Share {
                id: "sh1".into(),
                project: P.into(),
                name: "docs".into(),
                host: "h1".into(),
                pool: "p1".into(),
                size_bytes: 1 << 20,
                path: "/data/sh1".into(),
                status: ShareStatus::Available,
                created_at_ms: 0,
                updated_at_ms: 0,
            })],
        })
        .expect("register share");
        f
    }

    fn m(f: &Fixture, c: ManilaCommand) -> CommandResult {
        f.apply(Command::Manila(c))
    }

    fn replica_of(r: CommandResult) -> Replica {
        match r {
            Ok(Outcome::Manila(o)) => match *o {
                ManilaOutcome::Replica(r) => r,
                other => panic!("expected a replica: {other:?}"),
            },
            other => panic!("expected a replica: {other:?}"),
        }
    }

    fn set_type(f: &Fixture, t: Option<ReplicationType>) -> CommandResult {
        m(
            f,
            ManilaCommand::SetReplicationType {
                share_id: "sh1".into(),
                replication_type: t,
                active_replica_id: "r1".into(),
                export_id: "e1".into(),
            },
        )
    }

    fn create(f: &Fixture, id: &str, az: Option<&str>, project: Option<&str>) -> CommandResult {
        m(
            f,
            ManilaCommand::CreateReplica {
                project: project.map(str::to_string),
                replica: Box::new(NewReplica {
                    id: id.into(),
                    share_id: "sh1".into(),
                    availability_zone: az.map(str::to_string),
                    only_host: None,
                    metadata: BTreeMap::new(),
                    export_id: format!("e-{id}"),
                }),
                job_id: format!("job-{id}"),
            },
        )
    }

    fn r(f: &Fixture, id: &str) -> Replica {
        f.store
            .get_share_replica(id)
            .expect("read")
            .expect("replica")
    }

    fn state(f: &Fixture, id: &str) -> ReplicaState {
        let rep = r(f, id);
        let pair = rep
            .pair_id
            .as_ref()
            .and_then(|p| f.store.get_pair(p).expect("read"));
        let active = f
            .store
            .replicas_of_share(&rep.share_id)
            .expect("read")
            .into_iter()
            .find(|x| x.active)
            .map(|x| x.volume_id);
        replica_state(&rep, pair.as_ref(), active.as_deref(), f.now)
    }

    /// Runs the job's ready tasks in order (each succeeds unless its kind is `fail_kind`).
    fn run(f: &Fixture, job_id: &str, fail_kind: Option<&str>) -> Vec<(String, String)> {
        let mut ran = Vec::new();
        loop {
            let tasks = f.store.job_tasks(job_id).expect("tasks");
            let Some(t) = tasks.iter().find(|t| t.status == TaskStatus::Ready) else {
                break;
            };
            let host = t.placement_host.clone().expect("placement");
            let token = f.assign_ok(&t.id, &host, 1);
            let outcome = if fail_kind == Some(t.kind.name()) {
                TaskOutcome::Failed {
                    reason: "disk on fire".into(),
                    retryable: false,
                }
            } else {
                TaskOutcome::Succeeded {
                    output: [("bytes_sent".to_string(), "10".to_string())].into(),
                }
            };
            f.jobs(JobsCommand::ReportResult {
                task_id: t.id.clone(),
                token,
                outcome,
            })
            .expect("report");
            ran.push((host, t.kind.name().to_string()));
        }
        ran
    }

    fn job_status(f: &Fixture, id: &str) -> JobStatus {
        f.job(id).status
    }

    #[test]
    fn create_needs_a_replication_type_then_places_on_a_distinct_backend() {
        // MANILA-SR-CREATE
        let f = setup();
        let e = create(&f, "r2", Some("az2"), Some(P)).expect_err("no type");
        assert!(matches!(e, CommandError::Invalid { .. }), "{e:?}");
        // No backend keeps several writable copies: a writable share finds no host.
        set_type(&f, Some(ReplicationType::Writable)).expect("set writable");
        let e = create(&f, "r2", Some("az2"), Some(P)).expect_err("writable");
        assert!(
            matches!(&e, CommandError::Invalid { reason, .. } if reason.contains("No valid host")),
            "{e:?}"
        );
        assert!(f.store.get_share_replica("r2").expect("read").is_none());
        set_type(&f, Some(ReplicationType::Dr)).expect("set type");
        let active = r(&f, "r1");
        assert!(active.active);
        assert_eq!(
            (active.host.as_str(), active.availability_zone.as_str()),
            ("h1", "az1")
        );
        assert_eq!(state(&f, "r1"), ReplicaState::Active);

        let r2 = replica_of(create(&f, "r2", Some("az2"), Some(P)));
        assert_eq!(r2.status, ReplicaStatus::Creating);
        assert_eq!(r2.host, "h2");
        assert_eq!(state(&f, "r2"), ReplicaState::OutOfSync);
        // The job reserved the pool bytes on h2.
        let h2 = f.store.get_host("h2").expect("read").expect("h2");
        assert!(h2.reservations.contains_key("job-r2"));
        let ran = run(&f, "job-r2", None);
        assert_eq!(
            ran,
            vec![
                ("h2".to_string(), "create_target".to_string()),
                ("h2".to_string(), "sync".to_string())
            ]
        );
        assert_eq!(job_status(&f, "job-r2"), JobStatus::Success);
        assert_eq!(r(&f, "r2").status, ReplicaStatus::Available);
        assert_eq!(state(&f, "r2"), ReplicaState::InSync);
        let h2 = f.store.get_host("h2").expect("read").expect("h2");
        assert!(h2.reservations.is_empty(), "released when the job ended");

        // h2 holds a copy already: az2 has no other backend.
        let e = create(&f, "r3", Some("az2"), Some(P)).expect_err("no host");
        assert!(e.to_string().contains("already holds a copy"), "{e}");
        let e = create(&f, "r3", Some("nowhere"), Some(P)).expect_err("unknown az");
        assert!(e.to_string().contains("not found"), "{e}");
        // Another project's share is a missing one.
        let e = create(&f, "r3", Some("az3"), Some("other")).expect_err("hidden");
        assert!(matches!(e, CommandError::NotFound { .. }), "{e:?}");
        // Without an AZ: the remaining backend.
        let r3 = replica_of(create(&f, "r3", None, Some(P)));
        assert_eq!(
            (r3.host.as_str(), r3.availability_zone.as_str()),
            ("h3", "az3")
        );
    }

    #[test]
    fn promote_fences_the_old_active_and_repoints_the_others() {
        // MANILA-SR-PROMOTE
        let f = setup();
        set_type(&f, Some(ReplicationType::Dr)).expect("set type");
        replica_of(create(&f, "r2", Some("az2"), Some(P)));
        run(&f, "job-r2", None);
        replica_of(create(&f, "r3", Some("az3"), Some(P)));
        run(&f, "job-r3", None);

        let promote = |id: &str, job: &str| {
            m(
                &f,
                ManilaCommand::Promote {
                    project: Some(P.into()),
                    replica_id: id.into(),
                    job_id: job.into(),
                    admin: false,
                },
            )
        };
        // The active replica: a no-op.
        assert!(matches!(
            promote("r1", "jp0"),
            Ok(Outcome::Manila(ref o)) if matches!(**o, ManilaOutcome::AlreadyActive(_))
        ));
        let t = replica_of(promote("r2", "jp1"));
        assert_eq!(t.status, ReplicaStatus::ReplicationChange);
        // The share is busy meanwhile.
        assert!(promote("r3", "jp2").is_err());
        let ran = run(&f, "jp1", None);
        assert_eq!(
            ran,
            vec![
                ("h2".to_string(), "sync".to_string()),
                ("h1".to_string(), "fence".to_string()),
                ("h2".to_string(), "promote".to_string()),
                ("h3".to_string(), "create_target".to_string()),
                ("h3".to_string(), "sync".to_string()),
            ]
        );
        assert_eq!(job_status(&f, "jp1"), JobStatus::Success);
        let (r1, r2, r3) = (r(&f, "r1"), r(&f, "r2"), r(&f, "r3"));
        assert!(r2.active && !r1.active && !r3.active);
        assert_eq!(r2.status, ReplicaStatus::Available);
        assert_eq!(r2.pair_id, None);
        let p1 = f
            .store
            .get_pair(r1.pair_id.as_deref().expect("r1 pair"))
            .expect("read")
            .expect("pair");
        assert_eq!(
            (p1.source.host.as_str(), p1.target.host.as_str()),
            ("h2", "h1")
        );
        let p3 = f
            .store
            .get_pair(r3.pair_id.as_deref().expect("r3 pair"))
            .expect("read")
            .expect("pair");
        assert_eq!(
            (p3.source.volume_id.as_str(), p3.target.host.as_str()),
            ("r2", "h3")
        );
        assert_eq!(p3.id, "r3.2");
        // The old pair r1 → r3 is gone.
        assert!(f.store.get_pair("r3.1").expect("read").is_none());
        assert_eq!(state(&f, "r1"), ReplicaState::InSync);
        assert_eq!(state(&f, "r2"), ReplicaState::Active);
        assert_eq!(state(&f, "r3"), ReplicaState::InSync);
        // Exactly one active replica.
        let actives = f
            .store
            .replicas_of_share("sh1")
            .expect("read")
            .into_iter()
            .filter(|x| x.active)
            .count();
        assert_eq!(actives, 1);
    }

    #[test]
    fn replica_state_follows_the_pair_and_admin_resets() {
        // MANILA-SR-RESET-REPLICA-STATE, MANILA-SR-RESYNC
        let mut f = setup();
        set_type(&f, Some(ReplicationType::Readable)).expect("set type");
        replica_of(create(&f, "r2", Some("az2"), Some(P)));
        run(&f, "job-r2", None);
        assert_eq!(state(&f, "r2"), ReplicaState::InSync);
        // Lagging: older than 2 × sleep time + grace.
        f.now += u64::from(REPLICA_SLEEP_TIME_S) * 2000 + IN_SYNC_GRACE_MS + 1;
        assert_eq!(state(&f, "r2"), ReplicaState::OutOfSync);
        // A member may not promote an out_of_sync replica; an admin may.
        let e = m(
            &f,
            ManilaCommand::Promote {
                project: Some(P.into()),
                replica_id: "r2".into(),
                job_id: "jp".into(),
                admin: false,
            },
        )
        .expect_err("policy");
        assert!(matches!(e, CommandError::Invalid { ref field, .. } if field == FIELD_POLICY));
        // Resync brings it back in sync.
        replica_of(m(
            &f,
            ManilaCommand::Resync {
                project: None,
                replica_id: "r2".into(),
                job_id: "js".into(),
            },
        ));
        assert_eq!(run(&f, "js", None).len(), 1);
        assert_eq!(state(&f, "r2"), ReplicaState::InSync);
        // An admin's reset holds until the pair changes.
        replica_of(m(
            &f,
            ManilaCommand::ResetReplicaState {
                project: None,
                replica_id: "r2".into(),
                replica_state: ReplicaState::Error,
            },
        ));
        assert_eq!(state(&f, "r2"), ReplicaState::Error);
        let e = m(
            &f,
            ManilaCommand::ResetReplicaState {
                project: None,
                replica_id: "r1".into(),
                replica_state: ReplicaState::Error,
            },
        )
        .expect_err("active");
        assert!(e.to_string().contains("active replica"), "{e}");
        f.now += 1;
        replica_of(m(
            &f,
            ManilaCommand::Resync {
                project: None,
                replica_id: "r2".into(),
                job_id: "js2".into(),
            },
        ));
        run(&f, "js2", None);
        assert_eq!(state(&f, "r2"), ReplicaState::InSync);
    }

    #[test]
    fn failed_create_is_error_and_resync_relinks() {
        let f = setup();
        set_type(&f, Some(ReplicationType::Dr)).expect("set type");
        replica_of(create(&f, "r2", Some("az2"), Some(P)));
        run(&f, "job-r2", Some("sync"));
        assert_eq!(job_status(&f, "job-r2"), JobStatus::Fail);
        let r2 = r(&f, "r2");
        assert_eq!(r2.status, ReplicaStatus::Error);
        assert!(r2
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("disk on fire")));
        assert_eq!(state(&f, "r2"), ReplicaState::Error);
        // The pair never synced: resync makes a new one from the active replica.
        replica_of(m(
            &f,
            ManilaCommand::Resync {
                project: None,
                replica_id: "r2".into(),
                job_id: "js".into(),
            },
        ));
        assert!(f.store.get_pair("r2.1").expect("read").is_none());
        run(&f, "js", None);
        let r2 = r(&f, "r2");
        assert_eq!(r2.pair_id.as_deref(), Some("r2.2"));
        assert_eq!(r2.status, ReplicaStatus::Available);
        assert_eq!(state(&f, "r2"), ReplicaState::InSync);
    }

    #[test]
    fn delete_refuses_the_active_replica_and_force_works_offline() {
        // MANILA-SR-DELETE, MANILA-SR-FORCE-DELETE, MANILA-SR-RESET-STATUS
        let f = setup();
        set_type(&f, Some(ReplicationType::Dr)).expect("set type");
        replica_of(create(&f, "r2", Some("az2"), Some(P)));
        run(&f, "job-r2", None);
        replica_of(create(&f, "r3", Some("az3"), Some(P)));
        run(&f, "job-r3", None);
        let del = |id: &str, job: &str, force: bool, project: Option<&str>| {
            m(
                &f,
                ManilaCommand::Delete {
                    project: project.map(str::to_string),
                    replica_id: id.into(),
                    job_id: job.into(),
                    force,
                },
            )
        };
        let e = del("r1", "jd1", false, Some(P)).expect_err("active");
        assert!(matches!(e, CommandError::Conflict(_)), "{e:?}");
        let e = del("r2", "jd1", false, Some("other")).expect_err("hidden");
        assert!(matches!(e, CommandError::NotFound { .. }), "{e:?}");
        let d = replica_of(del("r2", "jd2", false, Some(P)));
        assert_eq!(d.status, ReplicaStatus::Deleting);
        assert_eq!(
            run(&f, "jd2", None),
            vec![("h2".to_string(), "delete_volume".to_string())]
        );
        assert!(f.store.get_share_replica("r2").expect("read").is_none());
        assert!(f.store.get_pair("r2.1").expect("read").is_none());

        // Reset status, then force delete with the host offline: gone at once.
        replica_of(m(
            &f,
            ManilaCommand::ResetStatus {
                project: None,
                replica_id: "r3".into(),
                status: ReplicaStatus::Error,
            },
        ));
        assert_eq!(r(&f, "r3").status, ReplicaStatus::Error);
        f.inv(InventoryCommand::MarkHostOffline {
            name: "h3".into(),
            if_no_heartbeat_since_ms: None,
        })
        .expect("offline");
        replica_of(del("r3", "jd3", true, None));
        assert_eq!(job_status(&f, "jd3"), JobStatus::Success);
        assert!(f.store.get_share_replica("r3").expect("read").is_none());
        assert_eq!(f.store.replicas_of_share("sh1").expect("read").len(), 1);
        // Clearing the type removes the share's record.
        set_type(&f, None).expect("clear");
        assert!(f.store.get_manila_share("sh1").expect("read").is_none());
        assert!(f.store.replicas_of_share("sh1").expect("read").is_empty());
    }

    #[test]
    fn force_delete_preempts_a_create() {
        let f = setup();
        set_type(&f, Some(ReplicationType::Dr)).expect("set type");
        replica_of(create(&f, "r2", Some("az2"), Some(P)));
        let e = m(
            &f,
            ManilaCommand::Delete {
                project: Some(P.into()),
                replica_id: "r2".into(),
                job_id: "jd".into(),
                force: false,
            },
        )
        .expect_err("busy");
        assert!(e.to_string().contains("busy"), "{e}");
        replica_of(m(
            &f,
            ManilaCommand::Delete {
                project: None,
                replica_id: "r2".into(),
                job_id: "jd".into(),
                force: true,
            },
        ));
        assert_eq!(job_status(&f, "job-r2"), JobStatus::Fail);
        run(&f, "jd", None);
        assert!(f.store.get_share_replica("r2").expect("read").is_none());
    }
}
