//! Replication pairs: the link between a source copy of a volume (a server's disk, a share,
//! a database volume) and its target copy on another host, and the operations every API
//! family performs on it.
//!
//! A pair is always described from the current primary's point of view: `source` is the
//! writable copy, `target` the fenced replica. A failover swaps them when it ends.
//!
//! ```text
//!   Create ──► Creating ──job SUCCESS──► Active ◄──────────── Reinit (job SUCCESS)
//!                 │ FAIL                 │  ▲ periodic Sync jobs (enabled, every
//!                 ▼                      │  │ sleep_time_s), Sync, PlannedFailover
//!               Error ◄──── FAIL ────────┘  │ {keep_replicating}
//!                                           │
//!      PlannedFailover{keep_replicating: false} / UnplannedFailover ──► FailedOver
//!                                                        (reinit_required)
//!   Delete (any state) ──job SUCCESS──► gone
//! ```
//!
//! An operation is planned into a job (its own, or a larger one a family builds, such as
//! an SDRS group failover) with [`plan_op`]; [`begin_op`] marks the pair busy with that
//! job; when the job ends, [`on_job_end`] moves the pair to the operation's end state. A
//! user operation preempts a periodic sync (the sync job is cancelled); it never preempts
//! another user operation (409).
//!
//! Tasks of an operation, in order (each runs on its volume's host):
//! - `Create`: CreateTarget(target) → Sync(full).
//! - `Sync`: Sync (only changed blocks unless `full`).
//! - `PlannedFailover`: Sync (final) → Fence(source) → Promote(target). No data loss: the
//!   source is fenced only after the final sync, and the target is promoted only after
//!   the source is fenced, so there are never two writable copies.
//! - `UnplannedFailover`: Promote(target); the old source is fenced by the `Reinit`
//!   that brings it back.
//! - `Reinit` (after a failover; `source` is then the promoted copy): Fence(target, the old
//!   primary) → Sync (changed blocks only).
//! - `Delete`: DeleteVolume(target) when `delete_target`, else nothing.
//!
//! Recovery point: a sync job records when it started (`sync_started_ms`); when it ends
//! SUCCESS the target holds the source's data as of at least that time, which becomes
//! `recovery_point_ms`. RPO = now − recovery_point_ms.
//!
//! Column families (see [`CFS`]):
//! - `pairs`: pair id → [`Pair`];
//! - `pairs_due`: `next_sync_ms BE64 ++ id` for enabled Active pairs without a job;
//! - `pairs_by_owner`: `owner \0 id`; `pairs_by_job`: `job id \0 pair id` while busy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{CommandResult, Outcome};
use crate::error::{CommandError, StoreError};
use crate::inventory::{validate_id, validate_project};
use crate::jobs::{self, Job, JobStatus, NewJob, NewTask, Task, TaskKind, VolumeRef};
use crate::store::Store;
use crate::txn::Txn;

pub const CF_PAIRS: &str = "pairs";
pub const CF_PAIRS_DUE: &str = "pairs_due";
pub const CF_PAIRS_BY_OWNER: &str = "pairs_by_owner";
pub const CF_PAIRS_BY_JOB: &str = "pairs_by_job";

pub const CFS: &[&str] = &[CF_PAIRS, CF_PAIRS_DUE, CF_PAIRS_BY_OWNER, CF_PAIRS_BY_JOB];

/// Job type of the fence of an old primary after an unplanned failover.
pub const JOB_TYPE_FENCE_OLD: &str = "fenceOldPrimary";
/// Job type of the periodic syncs the leader starts (kept [`SYNC_JOB_RETENTION_MS`]).
pub const JOB_TYPE_PERIODIC_SYNC: &str = "replicationSync";
/// Finished periodic sync jobs are purged after one hour (user jobs: 24 h).
pub const SYNC_JOB_RETENTION_MS: u64 = 60 * 60 * 1000;
/// Danube's default and bounds for `sleep_time` (seconds).
pub const SLEEP_TIME_DEFAULT_S: u32 = 60;
pub const SLEEP_TIME_MAX_S: u32 = 86_400;
/// Periodic syncs started per command.
pub const DUE_SYNCS_MAX: usize = 512;
/// Owner strings: `family/kind/id`, e.g. `sdrs/instance/…`.
pub const OWNER_MAX: usize = 256;
/// Attempts of each task of an operation.
pub const OP_TASK_ATTEMPTS: u32 = 5;

/// Where a pair is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairState {
    /// The target is being created and fully synced.
    Creating,
    /// Replicating source → target (when enabled).
    Active,
    /// The target was promoted: both copies are no longer linked until a reinit.
    FailedOver,
    /// The last operation failed; see `last_error`. Any operation may be tried again.
    Error,
}

impl PairState {
    pub fn as_str(self) -> &'static str {
        match self {
            PairState::Creating => "creating",
            PairState::Active => "active",
            PairState::FailedOver => "failed_over",
            PairState::Error => "error",
        }
    }
}

/// An operation on a pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairOp {
    Create,
    Sync {
        full: bool,
        /// Started by the leader's replication timer (preemptible).
        periodic: bool,
    },
    /// Switchover without data loss; with `keep_replicating` the pair goes on replicating
    /// in the new direction (SDRS reverse), else it stops until a reinit (Danube failover).
    PlannedFailover {
        keep_replicating: bool,
    },
    /// Promote the target from its last synced point.
    UnplannedFailover,
    /// Restart replication after a failover: the old primary becomes the target and
    /// receives only the changed blocks.
    Reinit,
    Delete {
        delete_target: bool,
    },
    /// After an unplanned failover: fence the old primary (now the target) as soon as its
    /// host's agent is back, so it never comes back writable beside the promoted copy.
    /// Started by the state machine, preempted by any user operation (a reinit fences
    /// it first itself).
    FenceOldPrimary,
}

impl PairOp {
    pub fn name(&self) -> &'static str {
        match self {
            PairOp::Create => "create",
            PairOp::Sync { .. } => "sync",
            PairOp::PlannedFailover { .. } => "planned_failover",
            PairOp::UnplannedFailover => "unplanned_failover",
            PairOp::Reinit => "reinit",
            PairOp::Delete { .. } => "delete",
            PairOp::FenceOldPrimary => "fence_old_primary",
        }
    }

    /// Work the system started on its own, which a user operation preempts.
    fn is_preemptible(&self) -> bool {
        matches!(
            self,
            PairOp::Sync { periodic: true, .. } | PairOp::FenceOldPrimary
        )
    }
}

/// A replication pair as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub id: String,
    pub project: String,
    /// Who made it, `family/kind/id` (e.g. `danube/vm/<uuid>`); `native` for the admin API.
    pub owner: String,
    /// The writable (primary) copy.
    pub source: VolumeRef,
    /// The fenced replica.
    pub target: VolumeRef,
    pub state: PairState,
    /// Periodic syncs run only when enabled (Danube `enabled`).
    pub enabled: bool,
    /// Seconds between the end of one periodic sync and the start of the next.
    pub sleep_time_s: u32,
    pub bwlimit_bytes_per_sec: Option<u64>,
    /// The job that holds the pair now, and what it does.
    pub busy_job: Option<String>,
    pub pending_op: Option<PairOp>,
    /// When the running sync job was created (its data is at least that fresh).
    pub sync_started_ms: Option<u64>,
    /// When the last successful sync ended.
    pub last_sync_ms: Option<u64>,
    /// The target holds the source's data as of this time (RPO = now − this).
    pub recovery_point_ms: Option<u64>,
    /// When the next periodic sync is due (enabled Active pairs only).
    pub next_sync_ms: Option<u64>,
    pub bytes_sent_total: u64,
    pub last_sync_bytes: u64,
    pub syncs_ok: u64,
    pub syncs_failed: u64,
    pub last_error: Option<String>,
    /// Set by a failover; cleared by a successful reinit.
    pub reinit_required: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Pair {
    /// Seconds of data the target lacks at `now_ms` (None before the first sync).
    pub fn rpo_seconds(&self, now_ms: u64) -> Option<f64> {
        self.recovery_point_ms
            .map(|rp| now_ms.saturating_sub(rp) as f64 / 1000.0)
    }
}

/// A pair to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPair {
    pub id: String,
    pub project: String,
    pub owner: String,
    pub source: VolumeRef,
    pub target: VolumeRef,
    pub enabled: bool,
    pub sleep_time_s: u32,
    pub bwlimit_bytes_per_sec: Option<u64>,
}

/// Commands of the replication module (the native admin API and the leader's timer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationCommand {
    /// Create a pair and its creation job (`job_id`) at once. -> `Outcome::Pair`.
    Create { pair: Box<NewPair>, job_id: String },
    /// Change the replication settings. -> `Outcome::Pair`.
    Update {
        id: String,
        enabled: Option<bool>,
        sleep_time_s: Option<u32>,
        /// `Some(None)` removes the limit.
        bwlimit_bytes_per_sec: Option<Option<u64>>,
    },
    /// Run an operation (not `Create`) as its own job. -> `Outcome::Job`.
    Operate {
        id: String,
        op: PairOp,
        job_id: String,
        job_type: String,
    },
    /// The leader's replication timer: start a periodic sync job for each (pair id, job
    /// id) that is still due. -> `Outcome::TaskIds` (the job ids started).
    StartDueSyncs { syncs: Vec<(String, String)> },
}

impl ReplicationCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            ReplicationCommand::Create { pair, job_id } => {
                validate_new_pair(pair)?;
                validate_id("job_id", job_id)
            }
            ReplicationCommand::Update {
                id,
                sleep_time_s,
                bwlimit_bytes_per_sec,
                ..
            } => {
                validate_id("id", id)?;
                if let Some(s) = sleep_time_s {
                    validate_sleep_time(*s)?;
                }
                if let Some(Some(b)) = bwlimit_bytes_per_sec {
                    validate_bwlimit(*b)?;
                }
                Ok(())
            }
            ReplicationCommand::Operate {
                id,
                op,
                job_id,
                job_type,
            } => {
                validate_id("id", id)?;
                validate_id("job_id", job_id)?;
                jobs::validate_job_type(job_type)?;
                if *op == PairOp::Create {
                    return Err(CommandError::invalid(
                        "op",
                        "create a pair with the create command",
                    ));
                }
                Ok(())
            }
            ReplicationCommand::StartDueSyncs { syncs } => {
                if syncs.len() > DUE_SYNCS_MAX {
                    return Err(CommandError::invalid(
                        "syncs",
                        format!("at most {DUE_SYNCS_MAX} per command"),
                    ));
                }
                for (p, j) in syncs {
                    validate_id("pair_id", p)?;
                    validate_id("job_id", j)?;
                }
                Ok(())
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ReplicationCommand::Create { .. } => "create_pair",
            ReplicationCommand::Update { .. } => "update_pair",
            ReplicationCommand::Operate { .. } => "operate_pair",
            ReplicationCommand::StartDueSyncs { .. } => "start_due_syncs",
        }
    }
}

pub fn validate_sleep_time(s: u32) -> Result<(), CommandError> {
    if s == 0 || s > SLEEP_TIME_MAX_S {
        return Err(CommandError::invalid(
            "sleep_time",
            format!("must be 1 to {SLEEP_TIME_MAX_S} seconds"),
        ));
    }
    Ok(())
}

pub fn validate_bwlimit(b: u64) -> Result<(), CommandError> {
    if b == 0 {
        return Err(CommandError::invalid(
            "bwlimit",
            "must be a positive number of bytes per second; omit it for no limit",
        ));
    }
    Ok(())
}

pub fn validate_new_pair(p: &NewPair) -> Result<(), CommandError> {
    validate_id("id", &p.id)?;
    validate_project(&p.project)?;
    if p.owner.is_empty() || p.owner.len() > OWNER_MAX || p.owner.contains('\0') {
        return Err(CommandError::invalid(
            "owner",
            format!("must be 1 to {OWNER_MAX} bytes"),
        ));
    }
    validate_sleep_time(p.sleep_time_s)?;
    if let Some(b) = p.bwlimit_bytes_per_sec {
        validate_bwlimit(b)?;
    }
    if p.source.host == p.target.host {
        return Err(CommandError::invalid(
            "target.host",
            format!(
                "the target must be on another host than the source ('{}')",
                p.source.host
            ),
        ));
    }
    if p.source.layout != p.target.layout {
        return Err(CommandError::invalid(
            "target.layout",
            "must match the source's layout",
        ));
    }
    if p.target.size_bytes < p.source.size_bytes {
        return Err(CommandError::invalid(
            "target.size_bytes",
            "must be at least the source's size",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Storage helpers
// ---------------------------------------------------------------------------------------

fn be_key(time_ms: u64, id: &str) -> Vec<u8> {
    let mut k = time_ms.to_be_bytes().to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut k = a.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn not_found(id: &str) -> CommandError {
    CommandError::NotFound {
        kind: "replication pair".into(),
        id: id.to_string(),
    }
}

/// The pair as apply sees it.
pub(crate) fn load_pair(txn: &Txn<'_>, id: &str) -> Result<Option<Pair>, StoreError> {
    txn.get_record(CF_PAIRS, id.as_bytes())
}

/// Writes the pair and keeps its indexes right (`old` is the stored version, if any).
fn save_pair(txn: &mut Txn<'_>, old: Option<&Pair>, p: &Pair) -> Result<(), StoreError> {
    if let Some(o) = old {
        unindex(txn, o)?;
    }
    if let Some(due) = due_at(p) {
        txn.put(CF_PAIRS_DUE, &be_key(due, &p.id), Vec::new())?;
    }
    txn.put(CF_PAIRS_BY_OWNER, &pair_key(&p.owner, &p.id), Vec::new())?;
    if let Some(j) = &p.busy_job {
        txn.put(CF_PAIRS_BY_JOB, &pair_key(j, &p.id), Vec::new())?;
    }
    txn.put_record(CF_PAIRS, p.id.as_bytes(), p)
}

fn unindex(txn: &mut Txn<'_>, o: &Pair) -> Result<(), StoreError> {
    if let Some(due) = due_at(o) {
        txn.delete(CF_PAIRS_DUE, &be_key(due, &o.id))?;
    }
    txn.delete(CF_PAIRS_BY_OWNER, &pair_key(&o.owner, &o.id))?;
    if let Some(j) = &o.busy_job {
        txn.delete(CF_PAIRS_BY_JOB, &pair_key(j, &o.id))?;
    }
    Ok(())
}

fn remove_pair(txn: &mut Txn<'_>, p: &Pair) -> Result<(), StoreError> {
    unindex(txn, p)?;
    txn.delete(CF_PAIRS, p.id.as_bytes())
}

/// When the pair's next periodic sync is due, if it takes part in them.
fn due_at(p: &Pair) -> Option<u64> {
    if p.enabled && p.state == PairState::Active && p.busy_job.is_none() {
        p.next_sync_ms
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Operations, for this module's commands and for the families' composite commands
// ---------------------------------------------------------------------------------------

/// Checks that a pair may be created: the id is free, both hosts exist. Stages nothing.
pub(crate) fn check_new_pair(
    txn: &Txn<'_>,
    p: &NewPair,
) -> Result<Result<(), CommandError>, StoreError> {
    if let Err(e) = validate_new_pair(p) {
        return Ok(Err(e));
    }
    if load_pair(txn, &p.id)?.is_some() {
        return Ok(Err(CommandError::AlreadyExists {
            kind: "replication pair".into(),
            id: p.id.clone(),
        }));
    }
    for h in [&p.source.host, &p.target.host] {
        if crate::inventory::host_txn(txn, h)?.is_none() {
            return Ok(Err(CommandError::NotFound {
                kind: "host".into(),
                id: h.clone(),
            }));
        }
    }
    Ok(Ok(()))
}

/// Stages a new pair (state Creating, busy with `job_id`, whose tasks the caller plans
/// with `plan_op(.., &PairOp::Create, ..)`).
pub(crate) fn insert_pair(
    txn: &mut Txn<'_>,
    p: &NewPair,
    job_id: &str,
    now: u64,
) -> Result<Pair, StoreError> {
    let pair = Pair {
        id: p.id.clone(),
        project: p.project.clone(),
        owner: p.owner.clone(),
        source: p.source.clone(),
        target: p.target.clone(),
        state: PairState::Creating,
        enabled: p.enabled,
        sleep_time_s: p.sleep_time_s,
        bwlimit_bytes_per_sec: p.bwlimit_bytes_per_sec,
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
    };
    save_pair(txn, None, &pair)?;
    Ok(pair)
}

/// Whether `op` may start on `p` now. A periodic sync holding the pair does not block a
/// user operation ([`begin_op`] cancels it).
pub fn check_op(p: &Pair, op: &PairOp) -> Result<(), CommandError> {
    if let Some(job) = &p.busy_job {
        let preemptible =
            p.pending_op.as_ref().is_some_and(PairOp::is_preemptible) && !op.is_preemptible();
        if !preemptible {
            return Err(CommandError::Conflict(format!(
                "replication pair '{}' is busy with job '{job}' ({})",
                p.id,
                p.pending_op.as_ref().map_or("operation", PairOp::name)
            )));
        }
    }
    let ok = match op {
        PairOp::Create | PairOp::FenceOldPrimary => false,
        PairOp::Sync { .. } => matches!(p.state, PairState::Active | PairState::Error),
        PairOp::PlannedFailover { .. } => p.state == PairState::Active,
        PairOp::UnplannedFailover => matches!(p.state, PairState::Active | PairState::Error),
        PairOp::Reinit => matches!(p.state, PairState::FailedOver | PairState::Error),
        PairOp::Delete { .. } => true,
    };
    if !ok {
        return Err(CommandError::Conflict(format!(
            "replication pair '{}' is {}: {} is not possible in that state",
            p.id,
            p.state.as_str(),
            op.name()
        )));
    }
    if matches!(op, PairOp::Sync { .. } | PairOp::UnplannedFailover)
        && p.state == PairState::Error
        && p.recovery_point_ms.is_none()
    {
        return Err(CommandError::Conflict(format!(
            "replication pair '{}' never completed a sync: delete it and create it again",
            p.id
        )));
    }
    Ok(())
}

/// Adds the tasks of `op` on `p` to `job` (ids `{job.id}:{p.id}:{n}`), the first ones
/// depending on `after` (task ids already in `job`). Returns the ids of the op's last
/// task(s), for the caller to chain more work after them (empty when the op has no task:
/// then the caller's `after` still stands).
pub fn plan_op(p: &Pair, op: &PairOp, job: &mut NewJob, after: &[String]) -> Vec<String> {
    let mut n = 0;
    let mut prev: Vec<String> = after.to_vec();
    let mut push = |job: &mut NewJob, prev: &mut Vec<String>, kind: TaskKind| {
        n += 1;
        let id = format!("{}:{}:{n}", job.id, p.id);
        job.tasks.push(NewTask {
            id: id.clone(),
            kind,
            depends_on: prev.clone(),
            max_attempts: OP_TASK_ATTEMPTS,
            host: None,
        });
        *prev = vec![id];
    };
    let sync = |full: bool| TaskKind::Sync {
        pair_id: p.id.clone(),
        source: p.source.clone(),
        target: p.target.clone(),
        bwlimit_bytes_per_sec: p.bwlimit_bytes_per_sec,
        full,
    };
    match op {
        PairOp::Create => {
            push(
                job,
                &mut prev,
                TaskKind::CreateTarget {
                    pair_id: p.id.clone(),
                    source: p.source.clone(),
                    target: p.target.clone(),
                },
            );
            push(job, &mut prev, sync(true));
        }
        PairOp::Sync { full, .. } => push(job, &mut prev, sync(*full)),
        PairOp::PlannedFailover { .. } => {
            push(job, &mut prev, sync(false));
            push(
                job,
                &mut prev,
                TaskKind::Fence {
                    pair_id: p.id.clone(),
                    volume: p.source.clone(),
                },
            );
            push(
                job,
                &mut prev,
                TaskKind::Promote {
                    pair_id: p.id.clone(),
                    volume: p.target.clone(),
                },
            );
        }
        PairOp::UnplannedFailover => push(
            job,
            &mut prev,
            TaskKind::Promote {
                pair_id: p.id.clone(),
                volume: p.target.clone(),
            },
        ),
        PairOp::Reinit => {
            push(
                job,
                &mut prev,
                TaskKind::Fence {
                    pair_id: p.id.clone(),
                    volume: p.target.clone(),
                },
            );
            push(job, &mut prev, sync(false));
        }
        PairOp::FenceOldPrimary => push(
            job,
            &mut prev,
            TaskKind::Fence {
                pair_id: p.id.clone(),
                volume: p.target.clone(),
            },
        ),
        PairOp::Delete { delete_target } => {
            if *delete_target {
                push(
                    job,
                    &mut prev,
                    TaskKind::DeleteVolume {
                        pair_id: p.id.clone(),
                        volume: p.target.clone(),
                    },
                );
            }
        }
    }
    prev
}

/// Marks the pair busy with `job_id` doing `op` (after [`check_op`]); cancels a periodic
/// sync it preempts. The job must be staged in the same command.
pub(crate) fn begin_op(
    txn: &mut Txn<'_>,
    pair_id: &str,
    op: &PairOp,
    job_id: &str,
    now: u64,
) -> Result<Result<Pair, CommandError>, StoreError> {
    let Some(p) = load_pair(txn, pair_id)? else {
        return Ok(Err(not_found(pair_id)));
    };
    if let Err(e) = check_op(&p, op) {
        return Ok(Err(e));
    }
    if let Some(old_job) = p.busy_job.clone() {
        // A periodic sync: cancel it (its end hook frees the pair).
        jobs::cancel_job(
            txn,
            &old_job,
            &format!("preempted by {} of pair '{pair_id}'", op.name()),
            now,
        )?;
    }
    let Some(old) = load_pair(txn, pair_id)? else {
        return Ok(Err(not_found(pair_id)));
    };
    let mut p = old.clone();
    p.busy_job = Some(job_id.to_string());
    p.pending_op = Some(op.clone());
    if matches!(
        op,
        PairOp::Sync { .. } | PairOp::PlannedFailover { .. } | PairOp::Reinit
    ) {
        p.sync_started_ms = Some(now);
    }
    p.updated_at_ms = now;
    save_pair(txn, Some(&old), &p)?;
    Ok(Ok(p))
}

/// Called by the jobs module when any job ends: moves every pair the job held to its
/// operation's end state.
pub(crate) fn on_job_end(txn: &mut Txn<'_>, job: &Job, now: u64) -> Result<(), StoreError> {
    let prefix = pair_key(&job.id, "");
    for (key, _) in txn.scan_prefix(CF_PAIRS_BY_JOB, &prefix)? {
        let pair_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        let Some(old) = load_pair(txn, &pair_id)? else {
            txn.delete(CF_PAIRS_BY_JOB, &key)?;
            continue;
        };
        if old.busy_job.as_deref() != Some(job.id.as_str()) {
            txn.delete(CF_PAIRS_BY_JOB, &key)?;
            continue;
        }
        let mut p = old.clone();
        let op = p.pending_op.take();
        p.busy_job = None;
        p.updated_at_ms = now;
        let ok = job.status == JobStatus::Success;
        let reason = || {
            job.fail_reason
                .clone()
                .unwrap_or_else(|| "the job failed".to_string())
        };
        let next = now.saturating_add(u64::from(p.sleep_time_s) * 1000);
        match (op, ok) {
            (Some(PairOp::Delete { .. }), true) => {
                remove_pair(txn, &old)?;
                continue;
            }
            (Some(PairOp::Create), true) | (Some(PairOp::Reinit), true) => {
                p.state = PairState::Active;
                p.reinit_required = false;
                p.last_error = None;
                p.next_sync_ms = Some(next);
            }
            (Some(PairOp::Sync { .. }), true) => {
                p.state = PairState::Active;
                p.last_error = None;
                p.next_sync_ms = Some(next);
            }
            (Some(PairOp::PlannedFailover { keep_replicating }), true) => {
                std::mem::swap(&mut p.source, &mut p.target);
                p.last_error = None;
                if keep_replicating {
                    p.state = PairState::Active;
                    p.next_sync_ms = Some(next);
                } else {
                    p.state = PairState::FailedOver;
                    p.reinit_required = true;
                    p.next_sync_ms = None;
                }
            }
            (Some(PairOp::UnplannedFailover), true) => {
                std::mem::swap(&mut p.source, &mut p.target);
                p.state = PairState::FailedOver;
                p.reinit_required = true;
                p.last_error = None;
                p.next_sync_ms = None;
                // The old primary could not be fenced first (its host is lost): fence it
                // as soon as its agent is back, before anything else runs there.
                let fence_id = format!("{}:fence", job.id);
                let fence = op_job(&p, &PairOp::FenceOldPrimary, &fence_id, JOB_TYPE_FENCE_OLD);
                if jobs::check_new_job(txn, &fence)?.is_ok() {
                    jobs::insert_job(txn, &fence, None, now)?;
                    p.busy_job = Some(fence_id);
                    p.pending_op = Some(PairOp::FenceOldPrimary);
                }
            }
            (Some(PairOp::FenceOldPrimary), true) => {}
            (Some(PairOp::FenceOldPrimary), false) => {
                p.last_error = Some(format!(
                    "the old primary could not be fenced (a reinit fences it): {}",
                    reason()
                ));
            }
            (Some(PairOp::Sync { .. }), false) => {
                // A failed or cancelled sync leaves the previous copy; try again later.
                p.syncs_failed += 1;
                p.last_error = Some(reason());
                if p.state == PairState::Active {
                    p.next_sync_ms = Some(next);
                }
            }
            (Some(PairOp::Reinit), false) => {
                p.last_error = Some(reason());
            }
            (Some(PairOp::PlannedFailover { .. }), false) => {
                // The source may be fenced already: an operator decides (run it again,
                // or fail over unplanned).
                p.state = PairState::Error;
                p.last_error = Some(reason());
            }
            (Some(_), false) => {
                p.state = PairState::Error;
                p.last_error = Some(reason());
            }
            (None, _) => {}
        }
        p.sync_started_ms = None;
        save_pair(txn, Some(&old), &p)?;
    }
    Ok(())
}

/// Called by the jobs module when a task succeeds: a sync's figures go on its pair.
pub(crate) fn on_task_succeeded(
    txn: &mut Txn<'_>,
    task: &Task,
    now: u64,
) -> Result<(), StoreError> {
    let TaskKind::Sync { pair_id, .. } = &task.kind else {
        return Ok(());
    };
    let Some(old) = load_pair(txn, pair_id)? else {
        return Ok(());
    };
    if old.busy_job.as_deref() != Some(task.job_id.as_str()) {
        return Ok(());
    }
    let mut p = old.clone();
    let sent = task
        .output
        .get("bytes_sent")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    p.bytes_sent_total = p.bytes_sent_total.saturating_add(sent);
    p.last_sync_bytes = sent;
    p.syncs_ok += 1;
    p.last_sync_ms = Some(now);
    p.recovery_point_ms = p.sync_started_ms.or(Some(now));
    p.updated_at_ms = now;
    save_pair(txn, Some(&old), &p)
}

/// A pair one of whose copies is a volume of `w` (on `w`'s host), if any. Scans the
/// pairs: for the rare operator's delete of a workload, not for hot paths.
pub(crate) fn pair_using(
    txn: &Txn<'_>,
    w: &crate::inventory::Workload,
) -> Result<Option<String>, StoreError> {
    use crate::inventory::Workload;
    let volumes: Vec<&str> = match w {
        Workload::Server(s) => s.disks.iter().map(|d| d.id.as_str()).collect(),
        Workload::Share(s) => vec![s.id.as_str()],
        Workload::Database(d) => vec![d.volume.id.as_str()],
    };
    for (_, v) in txn.scan_prefix(CF_PAIRS, b"")? {
        let p: Pair = crate::codec::decode(&v)?;
        let uses = |r: &VolumeRef| r.host == w.host() && volumes.contains(&r.volume_id.as_str());
        if uses(&p.source) || uses(&p.target) {
            return Ok(Some(p.id));
        }
    }
    Ok(None)
}

/// The job of one operation on one pair.
fn op_job(p: &Pair, op: &PairOp, job_id: &str, job_type: &str) -> NewJob {
    let mut job = NewJob {
        id: job_id.to_string(),
        job_type: job_type.to_string(),
        project: p.project.clone(),
        entities: BTreeMap::from([
            ("pair_id".to_string(), p.id.clone()),
            ("operation".to_string(), op.name().to_string()),
        ]),
        tasks: Vec::new(),
        sub_jobs: Vec::new(),
    };
    plan_op(p, op, &mut job, &[]);
    job
}

/// Stages `op` on the pair as a job of its own. A job without tasks (delete without the
/// target) ends at once.
pub(crate) fn operate(
    txn: &mut Txn<'_>,
    pair_id: &str,
    op: &PairOp,
    job_id: &str,
    job_type: &str,
    now: u64,
) -> Result<Result<Job, CommandError>, StoreError> {
    let Some(p) = load_pair(txn, pair_id)? else {
        return Ok(Err(not_found(pair_id)));
    };
    if let Err(e) = check_op(&p, op) {
        return Ok(Err(e));
    }
    let job = op_job(&p, op, job_id, job_type);
    if let Err(e) = jobs::check_new_job(txn, &job)? {
        return Ok(Err(e));
    }
    if let Err(e) = begin_op(txn, pair_id, op, job_id, now)? {
        return Ok(Err(e));
    }
    let staged = jobs::insert_job(txn, &job, None, now)?;
    jobs::finish_if_empty(txn, &staged.id, now)?;
    Ok(Ok(jobs::load_job_txn(txn, job_id)?.unwrap_or(staged)))
}

pub(crate) fn apply(
    txn: &mut Txn<'_>,
    cmd: &ReplicationCommand,
    now: u64,
) -> Result<CommandResult, StoreError> {
    match cmd {
        ReplicationCommand::Create { pair, job_id } => {
            if let Err(e) = check_new_pair(txn, pair)? {
                return Ok(Err(e));
            }
            let mut staged = insert_pair(txn, pair, job_id, now)?;
            let job = op_job(&staged, &PairOp::Create, job_id, "createReplicationPair");
            if let Err(e) = jobs::check_new_job(txn, &job)? {
                return Ok(Err(e));
            }
            jobs::insert_job(txn, &job, None, now)?;
            staged = load_pair(txn, &pair.id)?.unwrap_or(staged);
            Ok(Ok(Outcome::Pair(Box::new(staged))))
        }
        ReplicationCommand::Update {
            id,
            enabled,
            sleep_time_s,
            bwlimit_bytes_per_sec,
        } => {
            let Some(old) = load_pair(txn, id)? else {
                return Ok(Err(not_found(id)));
            };
            let mut p = old.clone();
            if let Some(e) = enabled {
                p.enabled = *e;
            }
            if let Some(s) = sleep_time_s {
                p.sleep_time_s = *s;
            }
            if let Some(b) = bwlimit_bytes_per_sec {
                p.bwlimit_bytes_per_sec = *b;
            }
            if p.enabled && p.state == PairState::Active {
                // Re-enabled, or a new interval: next sync after at most the new interval.
                let next = now.saturating_add(u64::from(p.sleep_time_s) * 1000);
                let due = if old.enabled {
                    p.next_sync_ms.map_or(next, |n| n.min(next))
                } else {
                    now
                };
                p.next_sync_ms = Some(due);
            }
            p.updated_at_ms = now;
            save_pair(txn, Some(&old), &p)?;
            Ok(Ok(Outcome::Pair(Box::new(p))))
        }
        ReplicationCommand::Operate {
            id,
            op,
            job_id,
            job_type,
        } => Ok(operate(txn, id, op, job_id, job_type, now)?.map(|j| Outcome::Job(Box::new(j)))),
        ReplicationCommand::StartDueSyncs { syncs } => {
            let mut started = Vec::new();
            let op = PairOp::Sync {
                full: false,
                periodic: true,
            };
            for (pair_id, job_id) in syncs {
                let Some(p) = load_pair(txn, pair_id)? else {
                    continue;
                };
                // Still due? (A user operation or an update may have come first.)
                if due_at(&p).is_none_or(|d| d > now) {
                    continue;
                }
                if let Ok(Ok(_)) = operate(txn, pair_id, &op, job_id, JOB_TYPE_PERIODIC_SYNC, now) {
                    started.push(job_id.clone());
                }
            }
            Ok(Ok(Outcome::TaskIds(started)))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

impl Store {
    pub fn get_pair(&self, id: &str) -> Result<Option<Pair>, StoreError> {
        self.get_record(CF_PAIRS, id.as_bytes())
    }

    /// Every pair, by id.
    pub fn list_pairs(&self) -> Result<Vec<Pair>, StoreError> {
        Ok(self
            .scan_prefix::<Pair>(CF_PAIRS, b"")?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// The pairs of one owner (`family/kind/id`), by id.
    pub fn pairs_of_owner(&self, owner: &str) -> Result<Vec<Pair>, StoreError> {
        let prefix = pair_key(owner, "");
        let mut out = Vec::new();
        for key in self.scan_keys(CF_PAIRS_BY_OWNER, &prefix, usize::MAX)? {
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if let Some(p) = self.get_pair(&id)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Up to `limit` pairs whose periodic sync is due by `now_ms`, earliest first.
    pub fn due_pairs(&self, now_ms: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for key in self.scan_keys(CF_PAIRS_DUE, b"", limit)? {
            let Some((t, id)) = split_be_key(&key) else {
                continue;
            };
            if t > now_ms {
                break;
            }
            out.push(id);
        }
        Ok(out)
    }
}

fn split_be_key(key: &[u8]) -> Option<(u64, String)> {
    let t: [u8; 8] = key.get(..8)?.try_into().ok()?;
    Some((
        u64::from_be_bytes(t),
        String::from_utf8_lossy(&key[8..]).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::jobs::testkit::Fixture;
    use crate::jobs::{JobsCommand, TaskOutcome, TaskStatus, VolumeLayout};

    fn vol(host: &str) -> VolumeRef {
        VolumeRef {
            host: host.into(),
            pool: "p1".into(),
            volume_id: "disk-1".into(),
            path: String::new(),
            size_bytes: 1 << 20,
            layout: VolumeLayout::Block,
        }
    }

    fn setup() -> Fixture {
        let f = Fixture::new();
        f.site("s1");
        f.site("s2");
        f.host("h1", "s1");
        f.host("h2", "s2");
        f
    }

    fn repl(f: &Fixture, c: ReplicationCommand) -> CommandResult {
        f.apply(Command::Replication(c))
    }

    fn create(f: &Fixture) -> Pair {
        let pair = NewPair {
            id: "pair-1".into(),
            project: "proj1".into(),
            owner: "native".into(),
            source: vol("h1"),
            target: vol("h2"),
            enabled: true,
            sleep_time_s: 30,
            bwlimit_bytes_per_sec: Some(1 << 20),
        };
        match repl(
            f,
            ReplicationCommand::Create {
                pair: Box::new(pair),
                job_id: "job-create".into(),
            },
        ) {
            Ok(Outcome::Pair(p)) => *p,
            other => panic!("create pair: {other:?}"),
        }
    }

    fn pair(f: &Fixture) -> Pair {
        f.store.get_pair("pair-1").expect("read").expect("pair")
    }

    /// Runs the job's tasks in order on their placement hosts; each sync reports
    /// `bytes` sent. Returns the hosts the tasks ran on, with their kinds.
    fn run(f: &Fixture, job_id: &str, bytes: u64) -> Vec<(String, String)> {
        let mut ran = Vec::new();
        loop {
            let tasks = f.store.job_tasks(job_id).expect("tasks");
            let Some(t) = tasks.iter().find(|t| t.status == TaskStatus::Ready) else {
                break;
            };
            let host = t.placement_host.clone().expect("placement");
            let token = f.assign_ok(&t.id, &host, 1);
            let output = [("bytes_sent".to_string(), bytes.to_string())].into();
            f.jobs(JobsCommand::ReportResult {
                task_id: t.id.clone(),
                token,
                outcome: TaskOutcome::Succeeded { output },
            })
            .expect("report");
            ran.push((host, t.kind.name().to_string()));
        }
        ran
    }

    fn operate(f: &Fixture, op: PairOp, job: &str) -> CommandResult {
        repl(
            f,
            ReplicationCommand::Operate {
                id: "pair-1".into(),
                op,
                job_id: job.into(),
                job_type: "test".into(),
            },
        )
    }

    #[test]
    fn create_runs_on_the_target_then_schedules_periodic_syncs() {
        let mut f = setup();
        let p = create(&f);
        assert_eq!(p.state, PairState::Creating);
        assert_eq!(p.busy_job.as_deref(), Some("job-create"));
        let ran = run(&f, "job-create", 4096);
        assert_eq!(
            ran,
            vec![
                ("h2".to_string(), "create_target".to_string()),
                ("h2".to_string(), "sync".to_string())
            ]
        );
        let p = pair(&f);
        assert_eq!(p.state, PairState::Active);
        assert_eq!(p.busy_job, None);
        assert_eq!(p.bytes_sent_total, 4096);
        assert_eq!(p.recovery_point_ms, Some(f.now));
        assert_eq!(p.next_sync_ms, Some(f.now + 30_000));
        // Not due before the interval, due after it.
        assert!(f
            .store
            .due_pairs(f.now + 29_999, 10)
            .expect("due")
            .is_empty());
        f.now += 30_000;
        assert_eq!(f.store.due_pairs(f.now, 10).expect("due"), vec!["pair-1"]);
        let started = repl(
            &f,
            ReplicationCommand::StartDueSyncs {
                syncs: vec![("pair-1".into(), "sync-1".into())],
            },
        );
        assert_eq!(started, Ok(Outcome::TaskIds(vec!["sync-1".into()])));
        // Busy: no longer due, and a second start is skipped.
        assert!(f.store.due_pairs(u64::MAX, 10).expect("due").is_empty());
        let again = repl(
            &f,
            ReplicationCommand::StartDueSyncs {
                syncs: vec![("pair-1".into(), "sync-2".into())],
            },
        );
        assert_eq!(again, Ok(Outcome::TaskIds(vec![])));
        f.now += 1000;
        run(&f, "sync-1", 100);
        let p = pair(&f);
        assert_eq!(p.syncs_ok, 2);
        assert_eq!(p.bytes_sent_total, 4196);
        assert_eq!(p.last_sync_bytes, 100);
        // The recovery point is when the sync job started, not when it ended.
        assert_eq!(p.recovery_point_ms, Some(f.now - 1000));
        assert_eq!(p.rpo_seconds(f.now + 5000), Some(6.0));
    }

    #[test]
    fn disabled_pairs_are_never_due_and_reenabling_syncs_at_once() {
        let mut f = setup();
        create(&f);
        run(&f, "job-create", 1);
        let upd = |enabled| {
            repl(
                &f,
                ReplicationCommand::Update {
                    id: "pair-1".into(),
                    enabled: Some(enabled),
                    sleep_time_s: None,
                    bwlimit_bytes_per_sec: Some(None),
                },
            )
        };
        assert!(upd(false).is_ok());
        assert!(f.store.due_pairs(u64::MAX, 10).expect("due").is_empty());
        f.now += 5_000;
        let Ok(Outcome::Pair(p)) = repl(
            &f,
            ReplicationCommand::Update {
                id: "pair-1".into(),
                enabled: Some(true),
                sleep_time_s: None,
                bwlimit_bytes_per_sec: None,
            },
        ) else {
            panic!("update");
        };
        assert_eq!(p.bwlimit_bytes_per_sec, None);
        assert_eq!(f.store.due_pairs(f.now, 10).expect("due"), vec!["pair-1"]);
    }

    #[test]
    fn planned_failover_preempts_a_periodic_sync_then_reinit_reverses() {
        let mut f = setup();
        create(&f);
        run(&f, "job-create", 1);
        f.now += 30_000;
        repl(
            &f,
            ReplicationCommand::StartDueSyncs {
                syncs: vec![("pair-1".into(), "sync-1".into())],
            },
        )
        .expect("start");
        let op = PairOp::PlannedFailover {
            keep_replicating: false,
        };
        assert!(matches!(
            operate(&f, op.clone(), "fo-1"),
            Ok(Outcome::Job(_))
        ));
        // The periodic sync was cancelled; a second user operation is refused.
        assert_eq!(f.job("sync-1").status, JobStatus::Fail);
        assert!(matches!(
            operate(&f, PairOp::Reinit, "x"),
            Err(CommandError::Conflict(_))
        ));
        let ran = run(&f, "fo-1", 10);
        assert_eq!(
            ran,
            vec![
                ("h2".to_string(), "sync".to_string()),
                ("h1".to_string(), "fence".to_string()),
                ("h2".to_string(), "promote".to_string())
            ]
        );
        let p = pair(&f);
        assert_eq!(p.state, PairState::FailedOver);
        assert!(p.reinit_required);
        assert_eq!(p.source.host, "h2");
        assert_eq!(p.target.host, "h1");
        assert!(f.store.due_pairs(u64::MAX, 10).expect("due").is_empty());
        // Reinit: fence the old primary, then sync to it (pulled by h1 from h2).
        operate(&f, PairOp::Reinit, "re-1").expect("reinit");
        let ran = run(&f, "re-1", 10);
        assert_eq!(
            ran,
            vec![
                ("h1".to_string(), "fence".to_string()),
                ("h1".to_string(), "sync".to_string())
            ]
        );
        let p = pair(&f);
        assert_eq!(p.state, PairState::Active);
        assert!(!p.reinit_required);
    }

    #[test]
    fn unplanned_failover_promotes_only_and_failed_syncs_keep_the_pair_active() {
        let mut f = setup();
        create(&f);
        run(&f, "job-create", 1);
        // A failing sync: the pair stays active and says why.
        operate(
            &f,
            PairOp::Sync {
                full: false,
                periodic: false,
            },
            "s-1",
        )
        .expect("sync");
        f.jobs(JobsCommand::CancelJob {
            job_id: "s-1".into(),
            by: "test".into(),
        })
        .expect("cancel");
        let p = pair(&f);
        assert_eq!(p.state, PairState::Active);
        assert_eq!(p.syncs_failed, 1);
        assert!(p
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("cancelled")));
        f.now += 1;
        operate(&f, PairOp::UnplannedFailover, "u-1").expect("failover");
        let ran = run(&f, "u-1", 0);
        assert_eq!(ran, vec![("h2".to_string(), "promote".to_string())]);
        let p = pair(&f);
        assert_eq!(p.state, PairState::FailedOver);
        assert_eq!(p.source.host, "h2");
        // The old primary is fenced as soon as its agent is back (a job of its own).
        assert_eq!(p.busy_job.as_deref(), Some("u-1:fence"));
        assert_eq!(p.pending_op, Some(PairOp::FenceOldPrimary));
        assert_eq!(f.job("u-1:fence").job_type, JOB_TYPE_FENCE_OLD);
        let ran = run(&f, "u-1:fence", 0);
        assert_eq!(ran, vec![("h1".to_string(), "fence".to_string())]);
        let p = pair(&f);
        assert_eq!(p.busy_job, None);
        assert_eq!(p.state, PairState::FailedOver);
        // A reinit preempts a fence still waiting for its host.
        operate(&f, PairOp::Reinit, "re-1").expect("reinit");
        run(&f, "re-1", 1);
        operate(&f, PairOp::UnplannedFailover, "u-2").expect("failover again");
        run(&f, "u-2", 0);
        assert_eq!(pair(&f).busy_job.as_deref(), Some("u-2:fence"));
        operate(&f, PairOp::Reinit, "re-2").expect("reinit preempts the fence");
        assert_eq!(f.job("u-2:fence").status, JobStatus::Fail);
        let ran = run(&f, "re-2", 1);
        assert_eq!(
            ran,
            vec![
                ("h2".to_string(), "fence".to_string()),
                ("h2".to_string(), "sync".to_string())
            ]
        );
        // Delete without the target ends at once and removes the pair.
        let Ok(Outcome::Job(j)) = operate(
            &f,
            PairOp::Delete {
                delete_target: false,
            },
            "d-1",
        ) else {
            panic!("delete");
        };
        assert_eq!(j.status, JobStatus::Success);
        assert_eq!(f.store.get_pair("pair-1").expect("read"), None);
    }

    #[test]
    fn a_replicated_workload_cannot_be_deleted_from_under_its_pair() {
        use crate::inventory::{
            Disk, Flavor, InventoryCommand, Server, ServerStatus, Workload, WorkloadKind,
        };
        let f = setup();
        let server = Workload::Server(Server {
            id: "vm-1".into(),
            project: "proj1".into(),
            name: "vm".into(),
            host: "h1".into(),
            status: ServerStatus::Active,
            flavor: Flavor {
                vcpus: 1,
                ram_mb: 512,
            },
            disks: vec![Disk {
                id: "disk-1".into(),
                size_bytes: 1 << 20,
                pool: "p1".into(),
                path: String::new(),
            }],
            created_at_ms: 0,
            updated_at_ms: 0,
        });
        f.inv(InventoryCommand::RegisterWorkloads {
            workloads: vec![server],
        })
        .expect("register");
        create(&f);
        let del = || {
            f.inv(InventoryCommand::DeleteWorkload {
                kind: WorkloadKind::Server,
                id: "vm-1".into(),
            })
        };
        let r = del();
        assert!(
            matches!(&r, Err(CommandError::Conflict(m)) if m.contains("pair-1")),
            "{r:?}"
        );
        run(&f, "job-create", 1);
        operate(
            &f,
            PairOp::Delete {
                delete_target: false,
            },
            "d-1",
        )
        .expect("delete pair");
        assert_eq!(del(), Ok(Outcome::Done));
    }

    #[test]
    fn bad_pairs_are_refused() {
        let f = setup();
        let mut p = NewPair {
            id: "p".into(),
            project: "proj1".into(),
            owner: "native".into(),
            source: vol("h1"),
            target: vol("h1"),
            enabled: true,
            sleep_time_s: 30,
            bwlimit_bytes_per_sec: None,
        };
        assert!(validate_new_pair(&p).is_err());
        p.target = vol("nowhere");
        let r = repl(
            &f,
            ReplicationCommand::Create {
                pair: Box::new(p.clone()),
                job_id: "j".into(),
            },
        );
        assert!(matches!(r, Err(CommandError::NotFound { .. })), "{r:?}");
        p.target = vol("h2");
        p.sleep_time_s = 0;
        assert!(validate_new_pair(&p).is_err());
        // Nothing was staged by the refused create.
        assert!(f.store.list_pairs().expect("list").is_empty());
        // A refusal found after the pair was staged (the job id is taken) leaves no pair.
        f.create(crate::jobs::testkit::new_job(
            "taken",
            vec![crate::jobs::testkit::sleep_task("t", &[], 1)],
        ));
        p.sleep_time_s = 30;
        let r = repl(
            &f,
            ReplicationCommand::Create {
                pair: Box::new(p),
                job_id: "taken".into(),
            },
        );
        assert!(
            matches!(r, Err(CommandError::AlreadyExists { .. })),
            "{r:?}"
        );
        assert_eq!(f.store.get_pair("p").expect("read"), None);
        assert!(f.store.pairs_of_owner("native").expect("owner").is_empty());
    }
}
