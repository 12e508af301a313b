//! Jobs and their tasks: the replicated record of every asynchronous operation.
//!
//! A job (id, type, project, status INIT → RUNNING → SUCCESS | FAIL) owns tasks that form
//! a small acyclic graph, and optionally one level of sub-jobs (SDRS group jobs fan out
//! into one sub-job per pair). The leader's scheduler assigns ready tasks to hosts' agents
//! with a lease and a fencing token; agents report progress and a result; every step is a
//! command applied here, so a new leader resumes from this state alone.
//!
//! Task life cycle:
//!
//! ```text
//!  Pending ──(all deps Succeeded)──► Ready ──AssignTask──► Assigned ──progress──► Running
//!                                     ▲  ▲                    │ │                   │ │
//!           retry after backoff ──────┘  └── lease expired ───┘ │                   │ │
//!           (Failed report, attempts left)   (attempts left)    └─── result Ok ─────┴─┼─► Succeeded
//!                                                               result Err, no attempts left ─► Failed
//!  any non-terminal ──(job failed or cancelled)──► Cancelled
//! ```
//!
//! Fencing: each assignment counts an attempt (`attempt += 1`) and sets the task's token to
//! `{term, attempt}`. Renewals, progress and results are accepted only while the task is
//! Assigned or Running **and** carry exactly that token; anything else is refused with
//! `Conflict("stale fencing token …")` and changes nothing. So a deposed leader's or a
//! slow agent's report can never complete a task twice. (An exact repeat of the success
//! report that completed the task is answered with the task, unchanged, so an agent that
//! lost the reply can retry safely.)
//!
//! Retries: a failed attempt that is retryable and has attempts left becomes Ready again
//! after `retry_backoff_ms(attempt)` = 1 s · 2^(attempt-1), at most 60 s. A lease that
//! expires (see `ExpireLeases`) also ends the attempt; the task is Ready at once. When a
//! task fails for good the job ends FAIL with the reason, and the job's other unfinished
//! tasks (and sub-jobs) are Cancelled. A failed sub-job fails its parent.
//!
//! Retention: finished top-level jobs (with their tasks and sub-jobs) are kept at least
//! [`JOB_RETENTION_MS`] after they end, then purged in apply, at most
//! [`PURGE_PER_ENTRY`] jobs per log entry.
//!
//! A reservation (see `inventory`) whose holder is a job's id is released when that job
//! ends.
//!
//! Column families (see [`CFS`]):
//! - `jobs`: job id -> [`Job`]; `tasks`: task id -> [`Task`];
//! - `jobs_by_time`: `begin BE64 ++ job id`; `jobs_by_project`: `project \0 begin BE64 ++ id`;
//! - `jobs_finished`: `end BE64 ++ job id`, top-level jobs only (the purge queue);
//! - `tasks_ready`: `next_attempt_after BE64 ++ task id`, Ready tasks only;
//! - `task_leases`: `lease expiry BE64 ++ task id`, Assigned/Running tasks only;
//! - `tasks_by_host`: `host \0 task id`, Assigned/Running tasks only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::command::{CommandResult, Outcome};
use crate::error::{CommandError, StoreError};
use crate::inventory::{self, validate_host_name, validate_id, validate_project};
use crate::store::Store;
use crate::txn::Txn;

pub const CF_JOBS: &str = "jobs";
pub const CF_TASKS: &str = "tasks";
pub const CF_JOBS_BY_TIME: &str = "jobs_by_time";
pub const CF_JOBS_BY_PROJECT: &str = "jobs_by_project";
pub const CF_JOBS_FINISHED: &str = "jobs_finished";
pub const CF_TASKS_READY: &str = "tasks_ready";
pub const CF_TASK_LEASES: &str = "task_leases";
pub const CF_TASKS_BY_HOST: &str = "tasks_by_host";

/// This module's column families, in the order they are listed in `EXTRA_CFS`.
pub const CFS: &[&str] = &[
    CF_JOBS,
    CF_TASKS,
    CF_JOBS_BY_TIME,
    CF_JOBS_BY_PROJECT,
    CF_JOBS_FINISHED,
    CF_TASKS_READY,
    CF_TASK_LEASES,
    CF_TASKS_BY_HOST,
];

/// Finished jobs are kept at least this long after they end.
pub const JOB_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;
/// At most this many finished jobs (with their tasks and sub-jobs) are purged per entry.
pub const PURGE_PER_ENTRY: usize = 16;
/// First retry delay; doubles with each attempt.
pub const RETRY_BACKOFF_BASE_MS: u64 = 1000;
/// Longest retry delay.
pub const RETRY_BACKOFF_MAX_MS: u64 = 60_000;
/// Limits on one job.
pub const TASKS_PER_JOB_MAX: usize = 256;
pub const SUB_JOBS_MAX: usize = 256;
pub const TASKS_PER_TREE_MAX: usize = 1024;
pub const MAX_ATTEMPTS_MAX: u32 = 100;
pub const ENTITIES_MAX: usize = 32;
pub const ENTITY_VALUE_MAX: usize = 1024;
pub const JOB_TYPE_MAX: usize = 64;
/// Longest failure reason kept (longer ones are cut at a character boundary).
pub const REASON_MAX: usize = 4096;
/// Longest `Sleep` task.
pub const SLEEP_MAX_MS: u64 = 24 * 60 * 60 * 1000;
/// Most leases one `ExpireLeases` handles.
pub const EXPIRE_LIMIT_MAX: u32 = 1024;

/// `Job::error_code` when a task failed for good.
pub const ERROR_TASK_FAILED: &str = "TASK_FAILED";
/// `Job::error_code` when a task's last attempt lost its lease.
pub const ERROR_LEASE_EXPIRED: &str = "TASK_LEASE_EXPIRED";
/// `Job::error_code` of a cancelled job.
pub const ERROR_CANCELLED: &str = "JOB_CANCELLED";
/// `Job::error_code` of a parent whose sub-job failed.
pub const ERROR_SUB_JOB_FAILED: &str = "SUB_JOB_FAILED";

// ---------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------

/// Job status, with SDRS's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Created; no task has been assigned yet.
    Init,
    Running,
    Success,
    Fail,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Success | JobStatus::Fail)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Init => "INIT",
            JobStatus::Running => "RUNNING",
            JobStatus::Success => "SUCCESS",
            JobStatus::Fail => "FAIL",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "INIT" => Some(JobStatus::Init),
            "RUNNING" => Some(JobStatus::Running),
            "SUCCESS" => Some(JobStatus::Success),
            "FAIL" => Some(JobStatus::Fail),
            _ => None,
        }
    }
}

/// A job: one asynchronous operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// e.g. `createProtectedInstanceNoCG`.
    pub job_type: String,
    pub project: String,
    pub status: JobStatus,
    pub begin_time_ms: u64,
    pub end_time_ms: Option<u64>,
    /// Ids of what the job creates or acts on (`server_group_id`, `native_server_id`, …).
    pub entities: BTreeMap<String, String>,
    pub parent_id: Option<String>,
    pub sub_jobs: Vec<String>,
    /// Task ids, in creation order.
    pub tasks: Vec<String>,
    /// Set when FAIL: one of the `ERROR_*` constants.
    pub error_code: Option<String>,
    /// Set when FAIL: what went wrong, for a user to act on.
    pub fail_reason: Option<String>,
}

/// Task status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Waiting for its dependencies.
    Pending,
    /// May be assigned once `next_attempt_after_ms` has passed.
    Ready,
    /// Given to an agent under a lease; no report yet.
    Assigned,
    /// The agent reported progress.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// Assigned or Running: an agent holds it.
    pub fn is_active(self) -> bool {
        matches!(self, TaskStatus::Assigned | TaskStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Ready => "ready",
            TaskStatus::Assigned => "assigned",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

/// How a volume's data is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeLayout {
    /// A block device image (a server's disk, a database volume).
    Block,
    /// A directory tree (a share).
    Tree,
}

/// Where one copy of a volume lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRef {
    pub host: String,
    pub pool: String,
    /// Disk, share or volume id.
    pub volume_id: String,
    pub path: String,
    pub size_bytes: u64,
    pub layout: VolumeLayout,
}

/// One disk of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateDisk {
    pub source: VolumeRef,
    pub target: VolumeRef,
}

/// What a task does, with its parameters. New kinds go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskKind {
    /// Test task: waits `duration_ms`, fails its first `fail_attempts` attempts
    /// (retryable), then succeeds. Runs on any online host unless pinned.
    Sleep {
        duration_ms: u64,
        fail_attempts: u32,
    },
    /// Create the target copy of a volume (runs on the target's host).
    CreateTarget {
        pair_id: String,
        source: VolumeRef,
        target: VolumeRef,
    },
    /// Copy source → target, only changed blocks unless `full` (runs on the target's
    /// host, whose agent pulls from the source's agent).
    Sync {
        pair_id: String,
        source: VolumeRef,
        target: VolumeRef,
        bwlimit_bytes_per_sec: Option<u64>,
        full: bool,
    },
    /// Make a copy writable (runs on its host).
    Promote { pair_id: String, volume: VolumeRef },
    /// Make a copy read-only (runs on its host).
    Fence { pair_id: String, volume: VolumeRef },
    /// Cold-migrate a stopped server's disks (runs on the target host, whose agent pulls
    /// the disks from the source's agent).
    Migrate {
        server_id: String,
        source_host: String,
        target_host: String,
        disks: Vec<MigrateDisk>,
    },
    /// Remove a copy (runs on its host).
    DeleteVolume { pair_id: String, volume: VolumeRef },
    /// An action on a workload or one of its volumes, run by the agent of `host`.
    Workload {
        host: String,
        /// `server`, `share` or `database`.
        workload_kind: String,
        workload_id: String,
        action: WorkloadAction,
    },
}

/// What a [`TaskKind::Workload`] task does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadAction {
    Start,
    Stop,
    Restart,
    /// Make a new, writable volume (a new instance's disk).
    CreateVolume {
        volume: VolumeRef,
    },
    /// Grow a volume to `size_bytes` (never shrinks).
    ResizeVolume {
        volume: VolumeRef,
        size_bytes: u64,
    },
    /// Remove a volume and its data (deleting a missing one succeeds).
    DeleteVolume {
        volume: VolumeRef,
    },
}

impl WorkloadAction {
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadAction::Start => "start",
            WorkloadAction::Stop => "stop",
            WorkloadAction::Restart => "restart",
            WorkloadAction::CreateVolume { .. } => "create_volume",
            WorkloadAction::ResizeVolume { .. } => "resize_volume",
            WorkloadAction::DeleteVolume { .. } => "delete_volume",
        }
    }
}

impl TaskKind {
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::Sleep { .. } => "sleep",
            TaskKind::CreateTarget { .. } => "create_target",
            TaskKind::Sync { .. } => "sync",
            TaskKind::Promote { .. } => "promote",
            TaskKind::Fence { .. } => "fence",
            TaskKind::Migrate { .. } => "migrate",
            TaskKind::DeleteVolume { .. } => "delete_volume",
            TaskKind::Workload { .. } => "workload",
        }
    }

    /// The host the task must run on, when its kind fixes one.
    pub fn natural_host(&self) -> Option<&str> {
        match self {
            TaskKind::Sleep { .. } => None,
            TaskKind::CreateTarget { target, .. } => Some(&target.host),
            TaskKind::Sync { target, .. } => Some(&target.host),
            TaskKind::Promote { volume, .. }
            | TaskKind::Fence { volume, .. }
            | TaskKind::DeleteVolume { volume, .. } => Some(&volume.host),
            TaskKind::Migrate { target_host, .. } => Some(target_host),
            TaskKind::Workload { host, .. } => Some(host),
        }
    }

    fn validate(&self) -> Result<(), CommandError> {
        let vol = |field: &str, v: &VolumeRef| -> Result<(), CommandError> {
            validate_host_name(&format!("{field}.host"), &v.host)?;
            validate_host_name(&format!("{field}.pool"), &v.pool)?;
            validate_id(&format!("{field}.volume_id"), &v.volume_id)?;
            if v.path.len() > inventory::PATH_MAX || v.path.chars().any(char::is_control) {
                return Err(CommandError::invalid(
                    &format!("{field}.path"),
                    "at most 4096 bytes without control characters",
                ));
            }
            Ok(())
        };
        match self {
            TaskKind::Sleep { duration_ms, .. } => {
                if *duration_ms > SLEEP_MAX_MS {
                    return Err(CommandError::invalid(
                        "duration_ms",
                        format!("at most {SLEEP_MAX_MS}"),
                    ));
                }
                Ok(())
            }
            TaskKind::CreateTarget {
                pair_id,
                source,
                target,
            } => {
                validate_id("pair_id", pair_id)?;
                vol("source", source)?;
                vol("target", target)
            }
            TaskKind::Sync {
                pair_id,
                source,
                target,
                bwlimit_bytes_per_sec,
                ..
            } => {
                validate_id("pair_id", pair_id)?;
                vol("source", source)?;
                vol("target", target)?;
                if *bwlimit_bytes_per_sec == Some(0) {
                    return Err(CommandError::invalid(
                        "bwlimit_bytes_per_sec",
                        "must be positive; omit it for no limit",
                    ));
                }
                Ok(())
            }
            TaskKind::Promote { pair_id, volume }
            | TaskKind::Fence { pair_id, volume }
            | TaskKind::DeleteVolume { pair_id, volume } => {
                validate_id("pair_id", pair_id)?;
                vol("volume", volume)
            }
            TaskKind::Migrate {
                server_id,
                source_host,
                target_host,
                disks,
            } => {
                validate_id("server_id", server_id)?;
                validate_host_name("source_host", source_host)?;
                validate_host_name("target_host", target_host)?;
                if source_host == target_host {
                    return Err(CommandError::invalid(
                        "target_host",
                        "must differ from source_host",
                    ));
                }
                if disks.len() > inventory::DISKS_MAX {
                    return Err(CommandError::invalid(
                        "disks",
                        format!("at most {} disks", inventory::DISKS_MAX),
                    ));
                }
                for d in disks {
                    vol("disks.source", &d.source)?;
                    vol("disks.target", &d.target)?;
                }
                Ok(())
            }
            TaskKind::Workload {
                host,
                workload_kind,
                workload_id,
                action,
            } => {
                validate_host_name("host", host)?;
                if !matches!(workload_kind.as_str(), "server" | "share" | "database") {
                    return Err(CommandError::invalid(
                        "workload_kind",
                        "must be server, share or database",
                    ));
                }
                validate_id("workload_id", workload_id)?;
                match action {
                    WorkloadAction::Start | WorkloadAction::Stop | WorkloadAction::Restart => {
                        Ok(())
                    }
                    WorkloadAction::CreateVolume { volume }
                    | WorkloadAction::ResizeVolume { volume, .. }
                    | WorkloadAction::DeleteVolume { volume } => {
                        if &volume.host != host {
                            return Err(CommandError::invalid(
                                "action.volume.host",
                                "must be the task's host",
                            ));
                        }
                        vol("action.volume", volume)
                    }
                }
            }
        }
    }
}

/// Proof that an agent holds the current assignment of a task: the term of the leader
/// that assigned it and the attempt number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FencingToken {
    pub term: u64,
    pub attempt: u32,
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{term {}, attempt {}}}", self.term, self.attempt)
    }
}

/// How far the current attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    pub percent: u8,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A task: one step of a job, run by one agent at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub job_id: String,
    pub kind: TaskKind,
    /// Tasks of the same job that must succeed first.
    pub depends_on: Vec<String>,
    pub status: TaskStatus,
    /// Attempts started so far (each assignment is one).
    pub attempt: u32,
    pub max_attempts: u32,
    /// The host the task must run on (its kind's natural host, or pinned at creation).
    pub placement_host: Option<String>,
    /// The host of the current or latest attempt (it runs there only while Assigned or
    /// Running).
    pub assigned_host: Option<String>,
    /// Set only while Assigned or Running.
    pub lease_expiry_ms: Option<u64>,
    /// The token of the current or latest attempt.
    pub token: Option<FencingToken>,
    pub progress: Progress,
    /// What a successful attempt reported (e.g. bytes sent, created path).
    pub output: BTreeMap<String, String>,
    /// Why the latest attempt failed or was lost.
    pub last_error: Option<String>,
    /// A Ready task is not assigned before this time (retry backoff).
    pub next_attempt_after_ms: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
}

/// A task to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTask {
    pub id: String,
    pub kind: TaskKind,
    pub depends_on: Vec<String>,
    /// 1 to [`MAX_ATTEMPTS_MAX`].
    pub max_attempts: u32,
    /// Pin the task to a host (must agree with the kind's natural host, if any).
    pub host: Option<String>,
}

/// A job to create, with its tasks and (one level of) sub-jobs, all at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewJob {
    pub id: String,
    pub job_type: String,
    pub project: String,
    pub entities: BTreeMap<String, String>,
    pub tasks: Vec<NewTask>,
    pub sub_jobs: Vec<NewJob>,
}

/// What an agent reports at the end of an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskOutcome {
    Succeeded {
        output: BTreeMap<String, String>,
    },
    /// `retryable: false` fails the task at once, whatever attempts are left.
    Failed {
        reason: String,
        retryable: bool,
    },
}

/// The retry delay after failed attempt number `attempt` (1-based): 1 s · 2^(attempt-1),
/// at most [`RETRY_BACKOFF_MAX_MS`].
pub fn retry_backoff_ms(attempt: u32) -> u64 {
    let shift = attempt.saturating_sub(1).min(20);
    (RETRY_BACKOFF_BASE_MS << shift).min(RETRY_BACKOFF_MAX_MS)
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

/// Job and task changes. Add new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobsCommand {
    /// Create a job with its tasks and sub-jobs. Tasks without dependencies are Ready at
    /// once. -> `Outcome::Job` (the top-level job).
    CreateJob(Box<NewJob>),
    /// Give a task to `host` until `lease_until_ms`: only a Ready task past its backoff,
    /// or an Assigned/Running one whose lease has expired. Counts an attempt; the token
    /// becomes `{term, attempt}`. The host must exist, be online, and match the task's
    /// placement. -> `Outcome::Task`.
    AssignTask {
        task_id: String,
        host: String,
        term: u64,
        lease_until_ms: u64,
    },
    /// Extend the lease of the current attempt. -> `Outcome::Task`.
    RenewLease {
        task_id: String,
        token: FencingToken,
        lease_until_ms: u64,
    },
    /// Record progress (Assigned → Running), optionally extending the lease.
    /// -> `Outcome::Task`.
    ReportProgress {
        task_id: String,
        token: FencingToken,
        progress: Progress,
        lease_until_ms: Option<u64>,
    },
    /// End the current attempt. -> `Outcome::Task`.
    ReportResult {
        task_id: String,
        token: FencingToken,
        outcome: TaskOutcome,
    },
    /// Cancel a job that has not ended: its unfinished tasks and sub-jobs are Cancelled,
    /// it ends FAIL with reason "cancelled by <by>". -> `Outcome::Job`.
    CancelJob { job_id: String, by: String },
    /// End the attempts whose lease expired at the entry's time (up to `limit`, earliest
    /// first): Ready again, or Failed when no attempt is left. -> `Outcome::TaskIds` (the
    /// tasks whose lease was expired).
    ExpireLeases { limit: u32 },
}

impl JobsCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            JobsCommand::CreateJob(job) => validate_new_job(job),
            JobsCommand::AssignTask {
                task_id,
                host,
                lease_until_ms,
                ..
            } => {
                validate_id("task_id", task_id)?;
                validate_host_name("host", host)?;
                validate_lease(*lease_until_ms)
            }
            JobsCommand::RenewLease {
                task_id,
                lease_until_ms,
                ..
            } => {
                validate_id("task_id", task_id)?;
                validate_lease(*lease_until_ms)
            }
            JobsCommand::ReportProgress {
                task_id,
                progress,
                lease_until_ms,
                ..
            } => {
                validate_id("task_id", task_id)?;
                if progress.percent > 100 {
                    return Err(CommandError::invalid(
                        "progress.percent",
                        "must be 0 to 100",
                    ));
                }
                match lease_until_ms {
                    Some(l) => validate_lease(*l),
                    None => Ok(()),
                }
            }
            JobsCommand::ReportResult {
                task_id, outcome, ..
            } => {
                validate_id("task_id", task_id)?;
                if let TaskOutcome::Succeeded { output } = outcome {
                    validate_string_map("output", output)?;
                }
                Ok(())
            }
            JobsCommand::CancelJob { job_id, by } => {
                validate_id("job_id", job_id)?;
                if by.is_empty() || by.len() > 128 || by.chars().any(char::is_control) {
                    return Err(CommandError::invalid(
                        "by",
                        "must be 1 to 128 bytes without control characters",
                    ));
                }
                Ok(())
            }
            JobsCommand::ExpireLeases { limit } => {
                if *limit == 0 || *limit > EXPIRE_LIMIT_MAX {
                    return Err(CommandError::invalid(
                        "limit",
                        format!("must be 1 to {EXPIRE_LIMIT_MAX}"),
                    ));
                }
                Ok(())
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            JobsCommand::CreateJob(_) => "create_job",
            JobsCommand::AssignTask { .. } => "assign_task",
            JobsCommand::RenewLease { .. } => "renew_lease",
            JobsCommand::ReportProgress { .. } => "report_progress",
            JobsCommand::ReportResult { .. } => "report_result",
            JobsCommand::CancelJob { .. } => "cancel_job",
            JobsCommand::ExpireLeases { .. } => "expire_leases",
        }
    }
}

fn validate_lease(lease_until_ms: u64) -> Result<(), CommandError> {
    if lease_until_ms == 0 {
        return Err(CommandError::invalid(
            "lease_until_ms",
            "must be a time in milliseconds since the epoch",
        ));
    }
    Ok(())
}

fn validate_string_map(field: &str, map: &BTreeMap<String, String>) -> Result<(), CommandError> {
    if map.len() > ENTITIES_MAX {
        return Err(CommandError::invalid(
            field,
            format!("at most {ENTITIES_MAX} entries"),
        ));
    }
    for (k, v) in map {
        validate_id(&format!("{field} key"), k)?;
        if v.len() > ENTITY_VALUE_MAX || v.chars().any(char::is_control) {
            return Err(CommandError::invalid(
                field,
                format!(
                    "value of '{k}' must be at most {ENTITY_VALUE_MAX} bytes without control characters"
                ),
            ));
        }
    }
    Ok(())
}

/// Job types: 1 to 64 ASCII letters, digits, `_`, `-`, `.`, `:`.
pub fn validate_job_type(t: &str) -> Result<(), CommandError> {
    if t.is_empty()
        || t.len() > JOB_TYPE_MAX
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
    {
        return Err(CommandError::invalid(
            "type",
            format!("must be 1 to {JOB_TYPE_MAX} letters, digits, '_', '-', '.' or ':'"),
        ));
    }
    Ok(())
}

/// Stateless checks of a job tree: names, limits, unique ids, dependencies within the
/// job, no cycle.
pub fn validate_new_job(job: &NewJob) -> Result<(), CommandError> {
    let mut job_ids = BTreeSet::new();
    let mut task_ids = BTreeSet::new();
    let mut total = 0usize;
    validate_one_job(job, true, &mut job_ids, &mut task_ids, &mut total)?;
    if job.sub_jobs.len() > SUB_JOBS_MAX {
        return Err(CommandError::invalid(
            "sub_jobs",
            format!("at most {SUB_JOBS_MAX} sub-jobs"),
        ));
    }
    for sub in &job.sub_jobs {
        if !sub.sub_jobs.is_empty() {
            return Err(CommandError::invalid(
                "sub_jobs",
                format!(
                    "sub-job '{}' has sub-jobs; only one level is allowed",
                    sub.id
                ),
            ));
        }
        if sub.project != job.project {
            return Err(CommandError::invalid(
                "sub_jobs.project",
                format!("sub-job '{}' must be in the job's project", sub.id),
            ));
        }
        validate_one_job(sub, false, &mut job_ids, &mut task_ids, &mut total)?;
    }
    if total > TASKS_PER_TREE_MAX {
        return Err(CommandError::invalid(
            "tasks",
            format!("at most {TASKS_PER_TREE_MAX} tasks in a job and its sub-jobs"),
        ));
    }
    Ok(())
}

fn validate_one_job<'a>(
    job: &'a NewJob,
    top: bool,
    job_ids: &mut BTreeSet<&'a str>,
    task_ids: &mut BTreeSet<&'a str>,
    total: &mut usize,
) -> Result<(), CommandError> {
    validate_id("id", &job.id)?;
    if !job_ids.insert(&job.id) {
        return Err(CommandError::invalid(
            "id",
            format!("job id '{}' appears twice", job.id),
        ));
    }
    validate_job_type(&job.job_type)?;
    validate_project(&job.project)?;
    validate_string_map("entities", &job.entities)?;
    if job.tasks.is_empty() && (!top || job.sub_jobs.is_empty()) {
        return Err(CommandError::invalid(
            "tasks",
            format!("job '{}' needs at least one task or sub-job", job.id),
        ));
    }
    if job.tasks.len() > TASKS_PER_JOB_MAX {
        return Err(CommandError::invalid(
            "tasks",
            format!("at most {TASKS_PER_JOB_MAX} tasks per job"),
        ));
    }
    *total += job.tasks.len();
    let local: BTreeSet<&str> = job.tasks.iter().map(|t| t.id.as_str()).collect();
    for t in &job.tasks {
        validate_id("tasks.id", &t.id)?;
        if !task_ids.insert(&t.id) {
            return Err(CommandError::invalid(
                "tasks.id",
                format!("task id '{}' appears twice", t.id),
            ));
        }
        t.kind.validate()?;
        if t.max_attempts == 0 || t.max_attempts > MAX_ATTEMPTS_MAX {
            return Err(CommandError::invalid(
                "tasks.max_attempts",
                format!("must be 1 to {MAX_ATTEMPTS_MAX}"),
            ));
        }
        if let Some(h) = &t.host {
            validate_host_name("tasks.host", h)?;
            if let Some(natural) = t.kind.natural_host() {
                if natural != h {
                    return Err(CommandError::invalid(
                        "tasks.host",
                        format!(
                            "task '{}' ({}) runs on host '{natural}', not '{h}'",
                            t.id,
                            t.kind.name()
                        ),
                    ));
                }
            }
        }
        let mut deps = BTreeSet::new();
        for d in &t.depends_on {
            if d == &t.id {
                return Err(CommandError::invalid(
                    "tasks.depends_on",
                    format!("task '{}' depends on itself", t.id),
                ));
            }
            if !local.contains(d.as_str()) {
                return Err(CommandError::invalid(
                    "tasks.depends_on",
                    format!(
                        "task '{}' depends on '{d}', which is not a task of job '{}'",
                        t.id, job.id
                    ),
                ));
            }
            if !deps.insert(d.as_str()) {
                return Err(CommandError::invalid(
                    "tasks.depends_on",
                    format!("task '{}' lists '{d}' twice", t.id),
                ));
            }
        }
    }
    // Kahn's algorithm: every task must be reachable from the ones without dependencies.
    let mut remaining: BTreeMap<&str, usize> = job
        .tasks
        .iter()
        .map(|t| (t.id.as_str(), t.depends_on.len()))
        .collect();
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in &job.tasks {
        for d in &t.depends_on {
            dependents.entry(d.as_str()).or_default().push(&t.id);
        }
    }
    let mut queue: Vec<&str> = remaining
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(id, _)| *id)
        .collect();
    let mut done = 0usize;
    while let Some(id) = queue.pop() {
        done += 1;
        for dep in dependents.get(id).into_iter().flatten() {
            if let Some(n) = remaining.get_mut(dep) {
                *n -= 1;
                if *n == 0 {
                    queue.push(dep);
                }
            }
        }
    }
    if done != job.tasks.len() {
        let cyclic: Vec<&str> = remaining
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(id, _)| *id)
            .collect();
        return Err(CommandError::invalid(
            "tasks.depends_on",
            format!(
                "the dependencies of job '{}' form a cycle through {}",
                job.id,
                cyclic.join(", ")
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Keys and record helpers
// ---------------------------------------------------------------------------------------

fn time_key(time_ms: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn split_time_key(key: &[u8]) -> Option<(u64, String)> {
    if key.len() < 8 {
        return None;
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&key[..8]);
    Some((
        u64::from_be_bytes(t),
        String::from_utf8_lossy(&key[8..]).into_owned(),
    ))
}

fn project_key(project: &str, time_ms: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(project.len() + 9 + id.len());
    k.extend_from_slice(project.as_bytes());
    k.push(0);
    k.extend_from_slice(&time_key(time_ms, id));
    k
}

fn host_key(host: &str, task_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(host.len() + 1 + task_id.len());
    k.extend_from_slice(host.as_bytes());
    k.push(0);
    k.extend_from_slice(task_id.as_bytes());
    k
}

fn not_found(kind: &str, id: &str) -> CommandError {
    CommandError::NotFound {
        kind: kind.into(),
        id: id.into(),
    }
}

fn load_job(txn: &Txn<'_>, id: &str) -> Result<Option<Job>, StoreError> {
    txn.get_record(CF_JOBS, id.as_bytes())
}

fn save_job(txn: &mut Txn<'_>, job: &Job) -> Result<(), StoreError> {
    txn.put_record(CF_JOBS, job.id.as_bytes(), job)
}

fn load_task(txn: &Txn<'_>, id: &str) -> Result<Option<Task>, StoreError> {
    txn.get_record(CF_TASKS, id.as_bytes())
}

fn save_task(txn: &mut Txn<'_>, task: &Task) -> Result<(), StoreError> {
    txn.put_record(CF_TASKS, task.id.as_bytes(), task)
}

/// Removes the task's entries from the status indexes (before a status change).
fn unindex(txn: &mut Txn<'_>, task: &Task) -> Result<(), StoreError> {
    match task.status {
        TaskStatus::Ready => {
            txn.delete(
                CF_TASKS_READY,
                &time_key(task.next_attempt_after_ms, &task.id),
            )?;
        }
        TaskStatus::Assigned | TaskStatus::Running => {
            if let Some(expiry) = task.lease_expiry_ms {
                txn.delete(CF_TASK_LEASES, &time_key(expiry, &task.id))?;
            }
            if let Some(host) = &task.assigned_host {
                txn.delete(CF_TASKS_BY_HOST, &host_key(host, &task.id))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Adds the task's entries to the status indexes (after a status change).
fn index(txn: &mut Txn<'_>, task: &Task) -> Result<(), StoreError> {
    match task.status {
        TaskStatus::Ready => {
            txn.put(
                CF_TASKS_READY,
                &time_key(task.next_attempt_after_ms, &task.id),
                Vec::new(),
            )?;
        }
        TaskStatus::Assigned | TaskStatus::Running => {
            if let Some(expiry) = task.lease_expiry_ms {
                txn.put(CF_TASK_LEASES, &time_key(expiry, &task.id), Vec::new())?;
            }
            if let Some(host) = &task.assigned_host {
                txn.put(CF_TASKS_BY_HOST, &host_key(host, &task.id), Vec::new())?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Cuts a reason to [`REASON_MAX`] bytes at a character boundary.
fn clip(reason: &str) -> String {
    if reason.len() <= REASON_MAX {
        return reason.to_string();
    }
    let mut end = REASON_MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

// ---------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------

/// Applies one jobs command. Every refusal is decided before the first staged write.
pub(crate) fn apply(
    txn: &mut Txn<'_>,
    cmd: &JobsCommand,
    now: u64,
) -> Result<CommandResult, StoreError> {
    match cmd {
        JobsCommand::CreateJob(new) => {
            if let Err(e) = check_new_job(txn, new)? {
                return Ok(Err(e));
            }
            let job = insert_job(txn, new, None, now)?;
            Ok(Ok(Outcome::Job(Box::new(job))))
        }
        JobsCommand::AssignTask {
            task_id,
            host,
            term,
            lease_until_ms,
        } => assign_task(txn, task_id, host, *term, *lease_until_ms, now),
        JobsCommand::RenewLease {
            task_id,
            token,
            lease_until_ms,
        } => {
            let mut task = match check_token(txn, task_id, token)? {
                Ok(t) => t,
                Err(e) => return Ok(Err(e)),
            };
            if *lease_until_ms <= now {
                return Ok(Err(lease_in_past(*lease_until_ms, now)));
            }
            unindex(txn, &task)?;
            task.lease_expiry_ms = Some(*lease_until_ms);
            task.updated_at_ms = now;
            index(txn, &task)?;
            save_task(txn, &task)?;
            Ok(Ok(Outcome::Task(Box::new(task))))
        }
        JobsCommand::ReportProgress {
            task_id,
            token,
            progress,
            lease_until_ms,
        } => {
            let mut task = match check_token(txn, task_id, token)? {
                Ok(t) => t,
                Err(e) => return Ok(Err(e)),
            };
            if let Some(l) = lease_until_ms {
                if *l <= now {
                    return Ok(Err(lease_in_past(*l, now)));
                }
            }
            unindex(txn, &task)?;
            task.status = TaskStatus::Running;
            task.progress = *progress;
            if let Some(l) = lease_until_ms {
                task.lease_expiry_ms = Some(*l);
            }
            task.updated_at_ms = now;
            index(txn, &task)?;
            save_task(txn, &task)?;
            Ok(Ok(Outcome::Task(Box::new(task))))
        }
        JobsCommand::ReportResult {
            task_id,
            token,
            outcome,
        } => report_result(txn, task_id, token, outcome, now),
        JobsCommand::CancelJob { job_id, by } => {
            let Some(job) = load_job(txn, job_id)? else {
                return Ok(Err(not_found("job", job_id)));
            };
            if job.status.is_terminal() {
                return Ok(Err(CommandError::Conflict(format!(
                    "job '{job_id}' already ended with {}",
                    job.status.as_str()
                ))));
            }
            fail_job(
                txn,
                job_id,
                ERROR_CANCELLED,
                &format!("cancelled by {by}"),
                now,
            )?;
            let job = load_job(txn, job_id)?.unwrap_or(job);
            Ok(Ok(Outcome::Job(Box::new(job))))
        }
        JobsCommand::ExpireLeases { limit } => {
            let expired = expire_leases(txn, *limit as usize, now)?;
            Ok(Ok(Outcome::TaskIds(expired)))
        }
    }
}

fn lease_in_past(lease_until_ms: u64, now: u64) -> CommandError {
    CommandError::invalid(
        "lease_until_ms",
        format!("{lease_until_ms} is not after the state machine time {now}"),
    )
}

/// Checks a new job tree against the state: ids unused, pinned hosts known. Stages
/// nothing.
pub(crate) fn check_new_job(
    txn: &Txn<'_>,
    new: &NewJob,
) -> Result<Result<(), CommandError>, StoreError> {
    for job in std::iter::once(new).chain(new.sub_jobs.iter()) {
        if txn.get(CF_JOBS, job.id.as_bytes())?.is_some() {
            return Ok(Err(CommandError::AlreadyExists {
                kind: "job".into(),
                id: job.id.clone(),
            }));
        }
        for t in &job.tasks {
            if txn.get(CF_TASKS, t.id.as_bytes())?.is_some() {
                return Ok(Err(CommandError::AlreadyExists {
                    kind: "task".into(),
                    id: t.id.clone(),
                }));
            }
            if let Some(h) = t.host.as_deref().or(t.kind.natural_host()) {
                if inventory::host_txn(txn, h)?.is_none() {
                    return Ok(Err(not_found("host", h)));
                }
            }
        }
    }
    Ok(Ok(()))
}

/// Stages a job tree checked by [`check_new_job`]; returns the top-level job.
pub(crate) fn insert_job(
    txn: &mut Txn<'_>,
    new: &NewJob,
    parent: Option<&str>,
    now: u64,
) -> Result<Job, StoreError> {
    let job = Job {
        id: new.id.clone(),
        job_type: new.job_type.clone(),
        project: new.project.clone(),
        status: JobStatus::Init,
        begin_time_ms: now,
        end_time_ms: None,
        entities: new.entities.clone(),
        parent_id: parent.map(str::to_string),
        sub_jobs: new.sub_jobs.iter().map(|j| j.id.clone()).collect(),
        tasks: new.tasks.iter().map(|t| t.id.clone()).collect(),
        error_code: None,
        fail_reason: None,
    };
    for t in &new.tasks {
        let task = Task {
            id: t.id.clone(),
            job_id: job.id.clone(),
            kind: t.kind.clone(),
            depends_on: t.depends_on.clone(),
            status: if t.depends_on.is_empty() {
                TaskStatus::Ready
            } else {
                TaskStatus::Pending
            },
            attempt: 0,
            max_attempts: t.max_attempts,
            placement_host: t
                .host
                .clone()
                .or_else(|| t.kind.natural_host().map(str::to_string)),
            assigned_host: None,
            lease_expiry_ms: None,
            token: None,
            progress: Progress::default(),
            output: BTreeMap::new(),
            last_error: None,
            next_attempt_after_ms: now,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
        };
        index(txn, &task)?;
        save_task(txn, &task)?;
    }
    save_job(txn, &job)?;
    txn.put(CF_JOBS_BY_TIME, &time_key(now, &job.id), Vec::new())?;
    txn.put(
        CF_JOBS_BY_PROJECT,
        &project_key(&job.project, now, &job.id),
        Vec::new(),
    )?;
    for sub in &new.sub_jobs {
        insert_job(txn, sub, Some(&job.id), now)?;
    }
    Ok(job)
}

fn assign_task(
    txn: &mut Txn<'_>,
    task_id: &str,
    host: &str,
    term: u64,
    lease_until_ms: u64,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let Some(mut task) = load_task(txn, task_id)? else {
        return Ok(Err(not_found("task", task_id)));
    };
    match task.status {
        TaskStatus::Ready => {
            if task.next_attempt_after_ms > now {
                return Ok(Err(CommandError::Conflict(format!(
                    "task '{task_id}' waits for its retry backoff until {} (now {now})",
                    task.next_attempt_after_ms
                ))));
            }
        }
        TaskStatus::Assigned | TaskStatus::Running => {
            let expiry = task.lease_expiry_ms.unwrap_or(0);
            if expiry > now {
                return Ok(Err(CommandError::Conflict(format!(
                    "task '{task_id}' is {} on host '{}' under a lease until {expiry} (now {now})",
                    task.status.as_str(),
                    task.assigned_host.as_deref().unwrap_or("?")
                ))));
            }
        }
        other => {
            return Ok(Err(CommandError::Conflict(format!(
                "task '{task_id}' is {}; only a ready task, or one whose lease expired, can be assigned",
                other.as_str()
            ))));
        }
    }
    if task.attempt >= task.max_attempts {
        return Ok(Err(CommandError::Conflict(format!(
            "task '{task_id}' has used all {} attempts; expire its lease to end it",
            task.max_attempts
        ))));
    }
    if let Some(tok) = task.token {
        if term < tok.term {
            return Ok(Err(CommandError::Conflict(format!(
                "stale term {term}: task '{task_id}' was last assigned in term {}",
                tok.term
            ))));
        }
    }
    if let Some(pinned) = &task.placement_host {
        if pinned != host {
            return Ok(Err(CommandError::Conflict(format!(
                "task '{task_id}' ({}) must run on host '{pinned}', not '{host}'",
                task.kind.name()
            ))));
        }
    }
    match inventory::host_txn(txn, host)? {
        None => return Ok(Err(not_found("host", host))),
        Some(h) if !h.is_online() => {
            return Ok(Err(CommandError::Conflict(format!(
                "host '{host}' is offline; tasks go to online hosts only"
            ))))
        }
        Some(_) => {}
    }
    if lease_until_ms <= now {
        return Ok(Err(lease_in_past(lease_until_ms, now)));
    }
    let Some(job) = load_job(txn, &task.job_id)? else {
        return Err(StoreError::Codec(format!(
            "task '{task_id}' names job '{}', which does not exist",
            task.job_id
        )));
    };
    if job.status.is_terminal() {
        return Ok(Err(CommandError::Conflict(format!(
            "job '{}' already ended with {}",
            job.id,
            job.status.as_str()
        ))));
    }

    if task.status.is_active() {
        task.last_error = Some(format!(
            "attempt {} lost its lease on host '{}' at {}",
            task.attempt,
            task.assigned_host.as_deref().unwrap_or("?"),
            task.lease_expiry_ms.unwrap_or(0)
        ));
    }
    unindex(txn, &task)?;
    task.attempt += 1;
    task.token = Some(FencingToken {
        term,
        attempt: task.attempt,
    });
    task.status = TaskStatus::Assigned;
    task.assigned_host = Some(host.to_string());
    task.lease_expiry_ms = Some(lease_until_ms);
    task.progress = Progress::default();
    task.updated_at_ms = now;
    index(txn, &task)?;
    save_task(txn, &task)?;
    mark_running(txn, job)?;
    Ok(Ok(Outcome::Task(Box::new(task))))
}

/// INIT → RUNNING for a job and its parent.
fn mark_running(txn: &mut Txn<'_>, mut job: Job) -> Result<(), StoreError> {
    if job.status != JobStatus::Init {
        return Ok(());
    }
    job.status = JobStatus::Running;
    save_job(txn, &job)?;
    if let Some(parent) = &job.parent_id {
        if let Some(p) = load_job(txn, parent)? {
            mark_running(txn, p)?;
        }
    }
    Ok(())
}

/// The task, if `token` is its current token and an agent holds it.
fn check_token(
    txn: &Txn<'_>,
    task_id: &str,
    token: &FencingToken,
) -> Result<Result<Task, CommandError>, StoreError> {
    let Some(task) = load_task(txn, task_id)? else {
        return Ok(Err(not_found("task", task_id)));
    };
    if task.token != Some(*token) {
        let current = match task.token {
            Some(t) => format!("the current token is {t}"),
            None => "the task was never assigned".to_string(),
        };
        return Ok(Err(CommandError::Conflict(format!(
            "stale fencing token {token} for task '{task_id}': {current}"
        ))));
    }
    if !task.status.is_active() {
        return Ok(Err(CommandError::Conflict(format!(
            "stale fencing token {token} for task '{task_id}': the attempt already ended and the task is {}",
            task.status.as_str()
        ))));
    }
    Ok(Ok(task))
}

fn report_result(
    txn: &mut Txn<'_>,
    task_id: &str,
    token: &FencingToken,
    outcome: &TaskOutcome,
    now: u64,
) -> Result<CommandResult, StoreError> {
    let mut task = match check_token(txn, task_id, token)? {
        Ok(t) => t,
        Err(e) => {
            // A repeat of the success report that completed the task: answer it unchanged.
            if let (Some(t), TaskOutcome::Succeeded { .. }) = (load_task(txn, task_id)?, outcome) {
                if t.status == TaskStatus::Succeeded && t.token == Some(*token) {
                    return Ok(Ok(Outcome::Task(Box::new(t))));
                }
            }
            return Ok(Err(e));
        }
    };
    unindex(txn, &task)?;
    task.lease_expiry_ms = None;
    task.updated_at_ms = now;
    match outcome {
        TaskOutcome::Succeeded { output } => {
            task.status = TaskStatus::Succeeded;
            task.output = output.clone();
            task.progress.percent = 100;
            task.finished_at_ms = Some(now);
            save_task(txn, &task)?;
            on_task_succeeded(txn, &task, now)?;
        }
        TaskOutcome::Failed { reason, retryable } => {
            let host = task.assigned_host.clone().unwrap_or_default();
            let reason = clip(reason);
            task.last_error = Some(reason.clone());
            if *retryable && task.attempt < task.max_attempts {
                task.status = TaskStatus::Ready;
                task.next_attempt_after_ms = now.saturating_add(retry_backoff_ms(task.attempt));
                index(txn, &task)?;
                save_task(txn, &task)?;
            } else {
                task.status = TaskStatus::Failed;
                task.finished_at_ms = Some(now);
                save_task(txn, &task)?;
                let why = if *retryable {
                    format!("attempt {} of {}", task.attempt, task.max_attempts)
                } else {
                    format!(
                        "attempt {} of {} (not retryable)",
                        task.attempt, task.max_attempts
                    )
                };
                fail_job(
                    txn,
                    &task.job_id,
                    ERROR_TASK_FAILED,
                    &format!(
                        "task '{}' ({}) failed on host '{host}' at {why}: {reason}",
                        task.id,
                        task.kind.name()
                    ),
                    now,
                )?;
            }
        }
    }
    let task = load_task(txn, task_id)?.unwrap_or(task);
    Ok(Ok(Outcome::Task(Box::new(task))))
}

/// Makes dependents Ready whose dependencies all succeeded; ends the job when every task
/// succeeded.
fn on_task_succeeded(txn: &mut Txn<'_>, done: &Task, now: u64) -> Result<(), StoreError> {
    crate::replication::on_task_succeeded(txn, done, now)?;
    let Some(job) = load_job(txn, &done.job_id)? else {
        return Ok(());
    };
    let mut tasks = Vec::with_capacity(job.tasks.len());
    for id in &job.tasks {
        if let Some(t) = load_task(txn, id)? {
            tasks.push(t);
        }
    }
    let succeeded: BTreeSet<&str> = tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Succeeded)
        .map(|t| t.id.as_str())
        .collect();
    let mut newly_ready = Vec::new();
    for t in &tasks {
        if t.status == TaskStatus::Pending
            && t.depends_on.iter().any(|d| d == &done.id)
            && t.depends_on.iter().all(|d| succeeded.contains(d.as_str()))
        {
            newly_ready.push(t.clone());
        }
    }
    let all_done = succeeded.len() == tasks.len();
    for mut t in newly_ready {
        t.status = TaskStatus::Ready;
        t.next_attempt_after_ms = now;
        t.updated_at_ms = now;
        index(txn, &t)?;
        save_task(txn, &t)?;
    }
    if all_done {
        maybe_succeed_job(txn, &job.id, now)?;
    }
    Ok(())
}

/// Ends a job SUCCESS when all its tasks and sub-jobs succeeded; then its parent.
fn maybe_succeed_job(txn: &mut Txn<'_>, job_id: &str, now: u64) -> Result<(), StoreError> {
    let Some(mut job) = load_job(txn, job_id)? else {
        return Ok(());
    };
    if job.status.is_terminal() {
        return Ok(());
    }
    for id in &job.tasks {
        if load_task(txn, id)?.is_none_or(|t| t.status != TaskStatus::Succeeded) {
            return Ok(());
        }
    }
    for id in &job.sub_jobs {
        if load_job(txn, id)?.is_none_or(|j| j.status != JobStatus::Success) {
            return Ok(());
        }
    }
    job.status = JobStatus::Success;
    job.end_time_ms = Some(now);
    save_job(txn, &job)?;
    job_ended(txn, &job, now)?;
    if let Some(parent) = &job.parent_id {
        maybe_succeed_job(txn, parent, now)?;
    }
    Ok(())
}

/// Ends a job FAIL (if it has not ended): cancels its unfinished tasks and sub-jobs, and
/// fails its parent.
fn fail_job(
    txn: &mut Txn<'_>,
    job_id: &str,
    code: &str,
    reason: &str,
    now: u64,
) -> Result<(), StoreError> {
    let Some(mut job) = load_job(txn, job_id)? else {
        return Ok(());
    };
    if job.status.is_terminal() {
        return Ok(());
    }
    job.status = JobStatus::Fail;
    job.end_time_ms = Some(now);
    job.error_code = Some(code.to_string());
    job.fail_reason = Some(clip(reason));
    save_job(txn, &job)?;
    for id in &job.tasks {
        let Some(mut t) = load_task(txn, id)? else {
            continue;
        };
        if t.status.is_terminal() {
            continue;
        }
        unindex(txn, &t)?;
        t.status = TaskStatus::Cancelled;
        t.lease_expiry_ms = None;
        t.finished_at_ms = Some(now);
        t.updated_at_ms = now;
        save_task(txn, &t)?;
    }
    for sub in &job.sub_jobs {
        fail_job(
            txn,
            sub,
            ERROR_CANCELLED,
            &format!("cancelled because job '{job_id}' failed"),
            now,
        )?;
    }
    job_ended(txn, &job, now)?;
    if let Some(parent) = &job.parent_id {
        fail_job(
            txn,
            parent,
            ERROR_SUB_JOB_FAILED,
            &format!("sub-job '{job_id}' failed: {reason}"),
            now,
        )?;
    }
    Ok(())
}

/// Bookkeeping when a job ends: its reservations are released; a top-level job joins the
/// purge queue.
fn job_ended(txn: &mut Txn<'_>, job: &Job, now: u64) -> Result<(), StoreError> {
    inventory::release_holder(txn, &job.id, now)?;
    if job.parent_id.is_none() {
        // The purge queue is keyed by end time and purges after JOB_RETENTION_MS; a job
        // kept shorter is queued as if it had ended earlier.
        let queued_at = match retention_of(&job.job_type) {
            Some(keep) => now.saturating_sub(JOB_RETENTION_MS.saturating_sub(keep)),
            None => now,
        };
        txn.put(CF_JOBS_FINISHED, &time_key(queued_at, &job.id), Vec::new())?;
    }
    crate::domain::on_job_end(txn, job, now)
}

/// Job types kept less than [`JOB_RETENTION_MS`] after they end.
fn retention_of(job_type: &str) -> Option<u64> {
    (job_type == crate::replication::JOB_TYPE_PERIODIC_SYNC)
        .then_some(crate::replication::SYNC_JOB_RETENTION_MS)
}

/// Ends a job FAIL as cancelled (for modules whose operation preempts a job).
pub(crate) fn cancel_job(
    txn: &mut Txn<'_>,
    job_id: &str,
    reason: &str,
    now: u64,
) -> Result<(), StoreError> {
    fail_job(txn, job_id, ERROR_CANCELLED, reason, now)
}

/// After [`insert_job`]: a job (or sub-job) without tasks has nothing to wait for and
/// ends SUCCESS at once.
pub(crate) fn finish_if_empty(txn: &mut Txn<'_>, job_id: &str, now: u64) -> Result<(), StoreError> {
    let Some(job) = load_job(txn, job_id)? else {
        return Ok(());
    };
    for sub in &job.sub_jobs {
        if load_job(txn, sub)?.is_some_and(|j| j.tasks.is_empty()) {
            maybe_succeed_job(txn, sub, now)?;
        }
    }
    maybe_succeed_job(txn, job_id, now)
}

/// The job as apply sees it (for other modules).
pub(crate) fn load_job_txn(txn: &Txn<'_>, id: &str) -> Result<Option<Job>, StoreError> {
    load_job(txn, id)
}

fn expire_leases(txn: &mut Txn<'_>, limit: usize, now: u64) -> Result<Vec<String>, StoreError> {
    let mut expired = Vec::new();
    for (key, _) in txn.scan_prefix_limit(CF_TASK_LEASES, b"", limit)? {
        let Some((expiry, task_id)) = split_time_key(&key) else {
            continue;
        };
        if expiry > now {
            break;
        }
        let Some(mut task) = load_task(txn, &task_id)? else {
            txn.delete(CF_TASK_LEASES, &key)?;
            continue;
        };
        // Cancelled earlier in this loop (its job failed): nothing to expire.
        if !task.status.is_active() || task.lease_expiry_ms != Some(expiry) {
            continue;
        }
        let host = task.assigned_host.clone().unwrap_or_default();
        unindex(txn, &task)?;
        task.lease_expiry_ms = None;
        task.updated_at_ms = now;
        task.last_error = Some(format!(
            "attempt {} lost its lease on host '{host}' at {expiry}",
            task.attempt
        ));
        if task.attempt < task.max_attempts {
            task.status = TaskStatus::Ready;
            task.next_attempt_after_ms = now;
            index(txn, &task)?;
            save_task(txn, &task)?;
        } else {
            task.status = TaskStatus::Failed;
            task.finished_at_ms = Some(now);
            save_task(txn, &task)?;
            fail_job(
                txn,
                &task.job_id,
                ERROR_LEASE_EXPIRED,
                &format!(
                    "task '{}' ({}) lost its lease on host '{host}' at attempt {} of {}: the agent stopped reporting",
                    task.id,
                    task.kind.name(),
                    task.attempt,
                    task.max_attempts
                ),
                now,
            )?;
        }
        expired.push(task_id);
    }
    Ok(expired)
}

/// Purges finished top-level jobs that ended more than [`JOB_RETENTION_MS`] ago, with
/// their tasks and sub-jobs; at most [`PURGE_PER_ENTRY`] per call. Called once per
/// applied entry.
pub(crate) fn purge_finished(txn: &mut Txn<'_>, now: u64) -> Result<(), StoreError> {
    let cutoff = now.saturating_sub(JOB_RETENTION_MS);
    for (key, _) in txn.scan_prefix_limit(CF_JOBS_FINISHED, b"", PURGE_PER_ENTRY)? {
        let Some((end, job_id)) = split_time_key(&key) else {
            continue;
        };
        if end >= cutoff {
            break;
        }
        purge_tree(txn, &job_id)?;
        txn.delete(CF_JOBS_FINISHED, &key)?;
    }
    Ok(())
}

fn purge_tree(txn: &mut Txn<'_>, job_id: &str) -> Result<(), StoreError> {
    let Some(job) = load_job(txn, job_id)? else {
        return Ok(());
    };
    for sub in &job.sub_jobs {
        purge_tree(txn, sub)?;
    }
    for id in &job.tasks {
        if let Some(t) = load_task(txn, id)? {
            unindex(txn, &t)?;
            txn.delete(CF_TASKS, id.as_bytes())?;
        }
    }
    txn.delete(CF_JOBS_BY_TIME, &time_key(job.begin_time_ms, &job.id))?;
    txn.delete(
        CF_JOBS_BY_PROJECT,
        &project_key(&job.project, job.begin_time_ms, &job.id),
    )?;
    txn.delete(CF_JOBS, job_id.as_bytes())?;
    Ok(())
}

/// Ids of up to `limit` tasks an agent on `host` holds, as apply sees them.
pub(crate) fn tasks_on_host_txn(
    txn: &Txn<'_>,
    host: &str,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let prefix = host_key(host, "");
    Ok(txn
        .scan_prefix_limit(CF_TASKS_BY_HOST, &prefix, limit)?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
        .collect())
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

/// Which jobs to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub project: Option<String>,
    pub status: Option<JobStatus>,
    pub job_type: Option<String>,
}

impl Store {
    pub fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.get_record(CF_JOBS, id.as_bytes())
    }

    pub fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.get_record(CF_TASKS, id.as_bytes())
    }

    /// Jobs (sub-jobs included), newest first, that match `filter`; at most `limit`,
    /// starting after the job `marker` (the last id of the previous page). An unknown
    /// marker gives an empty page.
    pub fn list_jobs(
        &self,
        filter: &JobFilter,
        marker: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let (cf, prefix) = match &filter.project {
            Some(p) => (CF_JOBS_BY_PROJECT, host_key(p, "")),
            None => (CF_JOBS_BY_TIME, Vec::new()),
        };
        let start = match marker {
            Some(m) => match self.get_job(m)? {
                Some(j) => {
                    let mut k = prefix.clone();
                    k.extend_from_slice(&time_key(j.begin_time_ms, &j.id));
                    k
                }
                None => return Ok(Vec::new()),
            },
            None => {
                let mut k = prefix.clone();
                k.extend_from_slice(&[0xFF; 9]);
                k
            }
        };
        let handle = self
            .db
            .cf_handle(cf)
            .ok_or(StoreError::MissingColumnFamily(cf))?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            handle,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Reverse),
        ) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if marker.is_some() && *k == *start {
                continue;
            }
            let Some((_, id)) = split_time_key(&k[prefix.len()..]) else {
                continue;
            };
            let Some(job) = self.get_job(&id)? else {
                continue;
            };
            if filter.status.is_some_and(|s| s != job.status)
                || filter
                    .job_type
                    .as_deref()
                    .is_some_and(|t| t != job.job_type)
            {
                continue;
            }
            out.push(job);
        }
        Ok(out)
    }

    /// A job's tasks, in creation order.
    pub fn job_tasks(&self, job_id: &str) -> Result<Vec<Task>, StoreError> {
        let Some(job) = self.get_job(job_id)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(job.tasks.len());
        for id in &job.tasks {
            if let Some(t) = self.get_task(id)? {
                out.push(t);
            }
        }
        Ok(out)
    }

    fn tasks_by_time_index(
        &self,
        cf: &'static str,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<Task>, StoreError> {
        let handle = self
            .db
            .cf_handle(cf)
            .ok_or(StoreError::MissingColumnFamily(cf))?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(handle, rocksdb::IteratorMode::Start) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item?;
            let Some((t, id)) = split_time_key(&k) else {
                continue;
            };
            if t > until_ms {
                break;
            }
            if let Some(task) = self.get_task(&id)? {
                out.push(task);
            }
        }
        Ok(out)
    }

    /// Ready tasks whose backoff ends at or before `due_by_ms`, earliest first, at most
    /// `limit`. Pass `u64::MAX` for every Ready task.
    pub fn ready_tasks(&self, due_by_ms: u64, limit: usize) -> Result<Vec<Task>, StoreError> {
        self.tasks_by_time_index(CF_TASKS_READY, due_by_ms, limit)
    }

    /// When the earliest Ready task may be assigned, if any task is Ready.
    pub fn next_ready_at(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .scan_keys(CF_TASKS_READY, b"", 1)?
            .first()
            .and_then(|k| split_time_key(k))
            .map(|(t, _)| t))
    }

    /// Assigned/Running tasks whose lease ends at or before `by_ms`, earliest first, at
    /// most `limit`. `u64::MAX` lists every held task (a new leader's view of the work
    /// in flight).
    pub fn leased_tasks(&self, by_ms: u64, limit: usize) -> Result<Vec<Task>, StoreError> {
        self.tasks_by_time_index(CF_TASK_LEASES, by_ms, limit)
    }

    /// The tasks an agent on `host` holds (Assigned or Running), by id.
    pub fn tasks_on_host(&self, host: &str) -> Result<Vec<Task>, StoreError> {
        let prefix = host_key(host, "");
        let mut out = Vec::new();
        for key in self.scan_keys(CF_TASKS_BY_HOST, &prefix, usize::MAX)? {
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if let Some(t) = self.get_task(&id)? {
                out.push(t);
            }
        }
        Ok(out)
    }
}

/// A store with helpers to apply commands at chosen times (shared with `inventory`'s
/// tests).
#[cfg(test)]
pub(crate) mod testkit {
    use std::collections::BTreeMap;

    use crate::command::{Command, CommandResult, Outcome, Proposal, ProposalBatch};
    use crate::inventory::{
        Capacity, Driver, HostRegistration, HostState, InventoryCommand, StoragePool,
    };
    use crate::store::Store;

    use super::*;

    pub const T0: u64 = 1_700_000_000_000;

    pub struct Fixture {
        pub store: Store,
        pub now: u64,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path()).expect("open");
            Fixture {
                store,
                now: T0,
                _dir: dir,
            }
        }

        /// Applies one command in its own entry at `self.now`.
        pub fn apply(&self, command: Command) -> CommandResult {
            self.apply_all(vec![command]).remove(0)
        }

        pub fn apply_all(&self, commands: Vec<Command>) -> Vec<CommandResult> {
            let batch = ProposalBatch {
                time_ms: self.now,
                proposals: commands
                    .into_iter()
                    .map(|command| Proposal {
                        request_id: None,
                        command,
                    })
                    .collect(),
            };
            self.store
                .apply_entry(Some(&batch), b"meta")
                .expect("apply entry")
        }

        pub fn inv(&self, c: InventoryCommand) -> CommandResult {
            self.apply(Command::Inventory(c))
        }

        pub fn jobs(&self, c: JobsCommand) -> CommandResult {
            self.apply(Command::Jobs(c))
        }

        pub fn site(&self, name: &str) {
            self.apply(Command::CreateSite {
                name: name.into(),
                description: String::new(),
            })
            .expect("create site");
        }

        /// An online host with 8 vCPUs, 16 GiB and one pool `p1` of 100 GiB (50 free).
        pub fn host(&self, name: &str, site: &str) {
            self.inv(InventoryCommand::RegisterHost(Box::new(registration(
                name, site,
            ))))
            .expect("register host");
        }

        pub fn task(&self, id: &str) -> Task {
            self.store.get_task(id).expect("read").expect("task exists")
        }

        pub fn job(&self, id: &str) -> Job {
            self.store.get_job(id).expect("read").expect("job exists")
        }

        pub fn create(&self, job: NewJob) -> Job {
            match self.jobs(JobsCommand::CreateJob(Box::new(job))) {
                Ok(Outcome::Job(j)) => *j,
                other => panic!("create job: {other:?}"),
            }
        }

        pub fn assign(&self, task: &str, host: &str, term: u64) -> CommandResult {
            self.jobs(JobsCommand::AssignTask {
                task_id: task.into(),
                host: host.into(),
                term,
                lease_until_ms: self.now + 10_000,
            })
        }

        /// Assigns and returns the new token.
        pub fn assign_ok(&self, task: &str, host: &str, term: u64) -> FencingToken {
            match self.assign(task, host, term) {
                Ok(Outcome::Task(t)) => t.token.expect("token"),
                other => panic!("assign {task}: {other:?}"),
            }
        }

        pub fn succeed(&self, task: &str, token: FencingToken) -> CommandResult {
            self.jobs(JobsCommand::ReportResult {
                task_id: task.into(),
                token,
                outcome: TaskOutcome::Succeeded {
                    output: BTreeMap::new(),
                },
            })
        }

        pub fn fail(&self, task: &str, token: FencingToken, reason: &str) -> CommandResult {
            self.jobs(JobsCommand::ReportResult {
                task_id: task.into(),
                token,
                outcome: TaskOutcome::Failed {
                    reason: reason.into(),
                    retryable: true,
                },
            })
        }
    }

    pub fn registration(name: &str, site: &str) -> HostRegistration {
        HostRegistration {
            name: name.into(),
            site: site.into(),
            driver: Driver::Sim,
            agent_address: format!("{name}:7000"),
            capacity: Capacity {
                vcpus: 8,
                ram_mb: 16_384,
                pools: vec![StoragePool {
                    name: "p1".into(),
                    total_bytes: 100 << 30,
                    free_bytes: 50 << 30,
                }],
            },
            state: Some(HostState::Online),
        }
    }

    pub fn sleep_task(id: &str, deps: &[&str], max_attempts: u32) -> NewTask {
        NewTask {
            id: id.into(),
            kind: TaskKind::Sleep {
                duration_ms: 10,
                fail_attempts: 0,
            },
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            max_attempts,
            host: None,
        }
    }

    pub fn new_job(id: &str, tasks: Vec<NewTask>) -> NewJob {
        NewJob {
            id: id.into(),
            job_type: "test".into(),
            project: "proj1".into(),
            entities: BTreeMap::new(),
            tasks,
            sub_jobs: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use crate::command::{Command, Outcome};
    use crate::inventory::{InventoryCommand, ResourceAmount};

    fn fixture() -> Fixture {
        let f = Fixture::new();
        f.site("s1");
        f.host("h1", "s1");
        f.host("h2", "s1");
        f
    }

    fn conflict(r: CommandResult) -> String {
        match r {
            Err(CommandError::Conflict(m)) => m,
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn create_job_makes_root_tasks_ready_and_others_pending() {
        let f = fixture();
        let job = f.create(new_job(
            "j1",
            vec![
                sleep_task("a", &[], 3),
                sleep_task("b", &["a"], 3),
                sleep_task("c", &[], 3),
            ],
        ));
        assert_eq!(job.status, JobStatus::Init);
        assert_eq!(job.begin_time_ms, T0);
        assert_eq!(job.tasks, vec!["a", "b", "c"]);
        assert_eq!(f.task("a").status, TaskStatus::Ready);
        assert_eq!(f.task("b").status, TaskStatus::Pending);
        let ready: Vec<String> = f
            .store
            .ready_tasks(T0, 10)
            .expect("ready")
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ready, vec!["a", "c"]);
        assert_eq!(f.store.next_ready_at().expect("next"), Some(T0));
        // Ids are unique.
        let again = f.jobs(JobsCommand::CreateJob(Box::new(new_job(
            "j2",
            vec![sleep_task("a", &[], 1)],
        ))));
        assert!(
            matches!(again, Err(CommandError::AlreadyExists { ref kind, .. }) if kind == "task")
        );
        let again = f.jobs(JobsCommand::CreateJob(Box::new(new_job(
            "j1",
            vec![sleep_task("z", &[], 1)],
        ))));
        assert!(
            matches!(again, Err(CommandError::AlreadyExists { ref kind, .. }) if kind == "job")
        );
    }

    #[test]
    fn dag_cycles_and_bad_dependencies_are_refused() {
        let cases = vec![
            (
                vec![
                    sleep_task("a", &["c"], 1),
                    sleep_task("b", &["a"], 1),
                    sleep_task("c", &["b"], 1),
                ],
                "cycle",
            ),
            (vec![sleep_task("a", &["a"], 1)], "itself"),
            (vec![sleep_task("a", &["nope"], 1)], "not a task"),
            (
                vec![sleep_task("a", &[], 1), sleep_task("a", &[], 1)],
                "twice",
            ),
            (vec![sleep_task("a", &[], 0)], "max_attempts"),
            (vec![], "at least one task"),
        ];
        let f = fixture();
        for (tasks, why) in cases {
            let cmd = JobsCommand::CreateJob(Box::new(new_job("j", tasks)));
            let err = cmd.validate().expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
            // apply refuses the same way, and stores nothing.
            assert_eq!(f.jobs(cmd), Err(err));
            assert!(f.store.get_job("j").expect("read").is_none());
        }
        // A diamond is fine.
        f.create(new_job(
            "ok",
            vec![
                sleep_task("a", &[], 1),
                sleep_task("b", &["a"], 1),
                sleep_task("c", &["a"], 1),
                sleep_task("d", &["b", "c"], 1),
            ],
        ));
    }

    #[test]
    fn assignment_sets_token_lease_and_job_running() {
        let f = fixture();
        f.create(new_job("j1", vec![sleep_task("a", &[], 3)]));
        let tok = f.assign_ok("a", "h1", 7);
        assert_eq!(
            tok,
            FencingToken {
                term: 7,
                attempt: 1
            }
        );
        let t = f.task("a");
        assert_eq!(t.status, TaskStatus::Assigned);
        assert_eq!(t.assigned_host.as_deref(), Some("h1"));
        assert_eq!(t.lease_expiry_ms, Some(T0 + 10_000));
        assert_eq!(f.job("j1").status, JobStatus::Running);
        assert!(f.store.ready_tasks(u64::MAX, 10).expect("ready").is_empty());
        let on_h1: Vec<String> = f
            .store
            .tasks_on_host("h1")
            .expect("on host")
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(on_h1, vec!["a"]);
        assert_eq!(f.store.leased_tasks(u64::MAX, 10).expect("leased").len(), 1);
        // Held under a live lease: not assignable again.
        let m = conflict(f.assign("a", "h2", 8));
        assert!(m.contains("under a lease"), "{m}");
    }

    #[test]
    fn assignment_refusals() {
        let mut f = fixture();
        f.create(new_job("j1", vec![sleep_task("a", &[], 3)]));
        assert!(matches!(
            f.assign("a", "ghost", 1),
            Err(CommandError::NotFound { ref kind, .. }) if kind == "host"
        ));
        f.inv(InventoryCommand::MarkHostOffline {
            name: "h2".into(),
            if_no_heartbeat_since_ms: None,
        })
        .expect("offline");
        assert!(conflict(f.assign("a", "h2", 1)).contains("offline"));
        assert!(matches!(
            f.assign("nope", "h1", 1),
            Err(CommandError::NotFound { ref kind, .. }) if kind == "task"
        ));
        let past = f.jobs(JobsCommand::AssignTask {
            task_id: "a".into(),
            host: "h1".into(),
            term: 1,
            lease_until_ms: T0,
        });
        assert!(
            matches!(past, Err(CommandError::Invalid { .. })),
            "{past:?}"
        );
        // A pinned task goes to its host only.
        let mut pinned = sleep_task("p", &[], 1);
        pinned.host = Some("h1".into());
        f.create(new_job("j2", vec![pinned]));
        assert!(conflict(f.assign("p", "h2", 1)).contains("must run on host 'h1'"));
        // A term older than the task's token is refused.
        let tok = f.assign_ok("a", "h1", 5);
        f.now += 20_000;
        assert!(conflict(f.assign("a", "h1", 4)).contains("stale term"));
        assert_eq!(f.task("a").token, Some(tok));
        // Nothing was left half-done by the refusals.
        assert_eq!(f.task("p").status, TaskStatus::Ready);
        assert_eq!(f.task("p").attempt, 0);
    }

    #[test]
    fn stale_fencing_token_is_refused_after_reassignment() {
        let mut f = fixture();
        f.create(new_job("j1", vec![sleep_task("a", &[], 3)]));
        let old = f.assign_ok("a", "h1", 1);
        // The agent on h1 goes quiet; its lease expires and the task moves to h2 under a
        // new leader.
        f.now += 10_001;
        let expired = f.jobs(JobsCommand::ExpireLeases { limit: 10 });
        assert_eq!(expired, Ok(Outcome::TaskIds(vec!["a".into()])));
        let new = f.assign_ok("a", "h2", 2);
        assert_eq!(
            new,
            FencingToken {
                term: 2,
                attempt: 2
            }
        );
        let before = f.task("a");
        let exported_before = f.store.export_snapshot().expect("export").0;

        // The slow agent on h1 reports with the old token: every kind of report is refused.
        let m = conflict(f.succeed("a", old));
        assert!(m.starts_with("stale fencing token"), "{m}");
        assert!(
            m.contains("{term 1, attempt 1}") && m.contains("{term 2, attempt 2}"),
            "{m}"
        );
        assert!(conflict(f.fail("a", old, "disk gone")).starts_with("stale fencing token"));
        assert!(conflict(f.jobs(JobsCommand::RenewLease {
            task_id: "a".into(),
            token: old,
            lease_until_ms: f.now + 5000,
        }))
        .starts_with("stale fencing token"));
        assert!(conflict(f.jobs(JobsCommand::ReportProgress {
            task_id: "a".into(),
            token: old,
            progress: Progress::default(),
            lease_until_ms: None,
        }))
        .starts_with("stale fencing token"));
        // Term right, attempt wrong: refused too.
        let forged = FencingToken {
            term: 2,
            attempt: 1,
        };
        assert!(conflict(f.succeed("a", forged)).starts_with("stale fencing token"));
        assert_eq!(f.task("a"), before, "refused reports change nothing");
        // Only the clock moved between the two exports.
        let exported_after = f.store.export_snapshot().expect("export").0;
        assert_eq!(exported_before.len(), exported_after.len());

        // The current holder completes it, once.
        assert!(
            matches!(f.succeed("a", new), Ok(Outcome::Task(ref t)) if t.status == TaskStatus::Succeeded)
        );
        assert_eq!(f.job("j1").status, JobStatus::Success);
        // A repeat of that same success report is answered with the task, unchanged.
        let done = f.task("a");
        assert!(matches!(f.succeed("a", new), Ok(Outcome::Task(ref t)) if **t == done));
        // But a late failure with the same token cannot undo it.
        assert!(conflict(f.fail("a", new, "late")).starts_with("stale fencing token"));
        assert!(conflict(f.succeed("a", old)).starts_with("stale fencing token"));
        assert_eq!(f.task("a"), done);
    }

    #[test]
    fn lease_expiry_counts_attempts_then_fails_the_job() {
        let mut f = fixture();
        f.create(new_job(
            "j1",
            vec![sleep_task("a", &[], 2), sleep_task("b", &["a"], 2)],
        ));
        f.assign_ok("a", "h1", 1);
        // Not yet expired: nothing happens.
        f.now += 10_000 - 1;
        assert_eq!(
            f.jobs(JobsCommand::ExpireLeases { limit: 10 }),
            Ok(Outcome::TaskIds(vec![]))
        );
        f.now += 1;
        assert_eq!(f.store.leased_tasks(f.now, 10).expect("expired").len(), 1);
        assert_eq!(
            f.jobs(JobsCommand::ExpireLeases { limit: 10 }),
            Ok(Outcome::TaskIds(vec!["a".into()]))
        );
        let t = f.task("a");
        assert_eq!(t.status, TaskStatus::Ready);
        assert_eq!(t.attempt, 1);
        assert_eq!(t.next_attempt_after_ms, f.now, "ready at once, no backoff");
        assert!(t
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("lost its lease"));
        assert!(f.store.tasks_on_host("h1").expect("on host").is_empty());

        // Second attempt, assigned directly after its lease ran out (no ExpireLeases).
        let tok2 = f.assign_ok("a", "h2", 1);
        assert_eq!(tok2.attempt, 2);
        f.now += 10_000;
        // Attempts exhausted: the direct reassignment is refused...
        assert!(conflict(f.assign("a", "h1", 1)).contains("used all 2 attempts"));
        // ...and the expiry fails the task and the job, cancelling the rest.
        assert_eq!(
            f.jobs(JobsCommand::ExpireLeases { limit: 10 }),
            Ok(Outcome::TaskIds(vec!["a".into()]))
        );
        let t = f.task("a");
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.attempt, 2);
        let job = f.job("j1");
        assert_eq!(job.status, JobStatus::Fail);
        assert_eq!(job.error_code.as_deref(), Some(ERROR_LEASE_EXPIRED));
        let reason = job.fail_reason.expect("reason");
        assert!(
            reason.contains("'a'") && reason.contains("h2") && reason.contains("attempt 2 of 2"),
            "{reason}"
        );
        assert_eq!(f.task("b").status, TaskStatus::Cancelled);
        assert!(f
            .store
            .leased_tasks(u64::MAX, 10)
            .expect("leased")
            .is_empty());
        assert!(f.store.ready_tasks(u64::MAX, 10).expect("ready").is_empty());
    }

    #[test]
    fn lease_expiry_reassignment_without_expire_command_counts_attempt() {
        let mut f = fixture();
        f.create(new_job("j1", vec![sleep_task("a", &[], 3)]));
        f.assign_ok("a", "h1", 1);
        f.now += 10_000;
        let tok = f.assign_ok("a", "h2", 1);
        assert_eq!(
            tok,
            FencingToken {
                term: 1,
                attempt: 2
            }
        );
        let t = f.task("a");
        assert_eq!(t.assigned_host.as_deref(), Some("h2"));
        assert!(f.store.tasks_on_host("h1").expect("h1").is_empty());
        assert_eq!(f.store.tasks_on_host("h2").expect("h2").len(), 1);
        assert_eq!(f.store.leased_tasks(u64::MAX, 10).expect("leased").len(), 1);
    }

    #[test]
    fn failures_retry_with_backoff_then_fail_the_job_with_the_reason() {
        let mut f = fixture();
        f.create(new_job(
            "j1",
            vec![sleep_task("a", &[], 3), sleep_task("other", &[], 3)],
        ));
        let t1 = f.assign_ok("a", "h1", 1);
        f.fail("a", t1, "checksum mismatch").expect("report");
        let t = f.task("a");
        assert_eq!(t.status, TaskStatus::Ready);
        assert_eq!(t.next_attempt_after_ms, f.now + 1000);
        assert_eq!(t.last_error.as_deref(), Some("checksum mismatch"));
        assert_eq!(f.job("j1").status, JobStatus::Running);
        // Not before the backoff.
        assert!(conflict(f.assign("a", "h1", 1)).contains("backoff"));
        assert_eq!(
            f.store.ready_tasks(f.now, 10).expect("ready").len(),
            1,
            "only 'other'"
        );
        f.now += 1000;
        let t2 = f.assign_ok("a", "h1", 1);
        assert_eq!(t2.attempt, 2);
        f.fail("a", t2, "checksum mismatch").expect("report");
        assert_eq!(f.task("a").next_attempt_after_ms, f.now + 2000);
        f.now += 2000;
        let t3 = f.assign_ok("a", "h2", 1);
        let other = f.assign_ok("other", "h1", 1);
        f.fail("a", t3, "checksum mismatch again").expect("report");
        let t = f.task("a");
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.finished_at_ms, Some(f.now));
        let job = f.job("j1");
        assert_eq!(job.status, JobStatus::Fail);
        assert_eq!(job.end_time_ms, Some(f.now));
        assert_eq!(job.error_code.as_deref(), Some(ERROR_TASK_FAILED));
        let reason = job.fail_reason.expect("reason");
        assert!(
            reason.contains(
                "task 'a' (sleep) failed on host 'h2' at attempt 3 of 3: checksum mismatch again"
            ),
            "{reason}"
        );
        // The other task was cancelled and its agent's report is refused.
        assert_eq!(f.task("other").status, TaskStatus::Cancelled);
        assert!(conflict(f.succeed("other", other)).starts_with("stale fencing token"));
        assert!(f.store.tasks_on_host("h1").expect("h1").is_empty());
    }

    #[test]
    fn column_families_are_registered_once_in_order() {
        let extra = crate::domain::EXTRA_CFS;
        for cfs in [crate::inventory::CFS, CFS] {
            let start = extra
                .iter()
                .position(|c| *c == cfs[0])
                .expect("registered in EXTRA_CFS");
            assert_eq!(&extra[start..start + cfs.len()], cfs);
        }
        let all = crate::store::all_cfs();
        let unique: BTreeSet<&str> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "no family listed twice");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(retry_backoff_ms(1), 1000);
        assert_eq!(retry_backoff_ms(2), 2000);
        assert_eq!(retry_backoff_ms(3), 4000);
        assert_eq!(retry_backoff_ms(6), 32_000);
        assert_eq!(retry_backoff_ms(7), RETRY_BACKOFF_MAX_MS);
        assert_eq!(retry_backoff_ms(100), RETRY_BACKOFF_MAX_MS);
    }

    #[test]
    fn non_retryable_failure_fails_at_once() {
        let f = fixture();
        f.create(new_job("j1", vec![sleep_task("a", &[], 5)]));
        let tok = f.assign_ok("a", "h1", 1);
        f.jobs(JobsCommand::ReportResult {
            task_id: "a".into(),
            token: tok,
            outcome: TaskOutcome::Failed {
                reason: "source volume missing".into(),
                retryable: false,
            },
        })
        .expect("report");
        let job = f.job("j1");
        assert_eq!(job.status, JobStatus::Fail);
        assert!(job
            .fail_reason
            .expect("reason")
            .contains("attempt 1 of 5 (not retryable): source volume missing"));
    }

    #[test]
    fn dependents_become_ready_only_after_all_dependencies_succeed() {
        let f = fixture();
        f.create(new_job(
            "j1",
            vec![
                sleep_task("a", &[], 1),
                sleep_task("b", &[], 1),
                sleep_task("c", &["a", "b"], 1),
            ],
        ));
        let ta = f.assign_ok("a", "h1", 1);
        let tb = f.assign_ok("b", "h2", 1);
        f.succeed("a", ta).expect("a");
        assert_eq!(f.task("c").status, TaskStatus::Pending);
        assert_eq!(f.job("j1").status, JobStatus::Running);
        // Progress on b moves it to Running and may extend the lease.
        f.jobs(JobsCommand::ReportProgress {
            task_id: "b".into(),
            token: tb,
            progress: Progress {
                percent: 40,
                bytes_done: 40,
                bytes_total: 100,
            },
            lease_until_ms: Some(T0 + 60_000),
        })
        .expect("progress");
        let b = f.task("b");
        assert_eq!(b.status, TaskStatus::Running);
        assert_eq!(b.progress.percent, 40);
        assert_eq!(b.lease_expiry_ms, Some(T0 + 60_000));
        assert_eq!(
            f.store.leased_tasks(T0 + 10_000, 10).expect("leased").len(),
            0
        );
        f.succeed("b", tb).expect("b");
        assert_eq!(f.task("c").status, TaskStatus::Ready);
        assert_eq!(f.store.ready_tasks(f.now, 10).expect("ready")[0].id, "c");
        let tc = f.assign_ok("c", "h1", 1);
        f.succeed("c", tc).expect("c");
        let job = f.job("j1");
        assert_eq!(job.status, JobStatus::Success);
        assert_eq!(job.end_time_ms, Some(f.now));
        assert!(job.error_code.is_none() && job.fail_reason.is_none());
    }

    #[test]
    fn renew_lease_moves_the_expiry() {
        let mut f = fixture();
        f.create(new_job("j1", vec![sleep_task("a", &[], 1)]));
        let tok = f.assign_ok("a", "h1", 1);
        f.now += 9_000;
        f.jobs(JobsCommand::RenewLease {
            task_id: "a".into(),
            token: tok,
            lease_until_ms: f.now + 10_000,
        })
        .expect("renew");
        f.now += 5_000;
        assert_eq!(
            f.jobs(JobsCommand::ExpireLeases { limit: 10 }),
            Ok(Outcome::TaskIds(vec![]))
        );
        assert_eq!(f.task("a").status, TaskStatus::Assigned);
        let past = f.jobs(JobsCommand::RenewLease {
            task_id: "a".into(),
            token: tok,
            lease_until_ms: f.now,
        });
        assert!(matches!(past, Err(CommandError::Invalid { .. })));
    }

    #[test]
    fn cancel_ends_the_job_and_its_tasks() {
        let f = fixture();
        f.create(new_job(
            "j1",
            vec![
                sleep_task("a", &[], 1),
                sleep_task("b", &["a"], 1),
                sleep_task("c", &[], 1),
            ],
        ));
        let ta = f.assign_ok("a", "h1", 1);
        let job = match f.jobs(JobsCommand::CancelJob {
            job_id: "j1".into(),
            by: "alice".into(),
        }) {
            Ok(Outcome::Job(j)) => *j,
            other => panic!("{other:?}"),
        };
        assert_eq!(job.status, JobStatus::Fail);
        assert_eq!(job.fail_reason.as_deref(), Some("cancelled by alice"));
        assert_eq!(job.error_code.as_deref(), Some(ERROR_CANCELLED));
        for id in ["a", "b", "c"] {
            assert_eq!(f.task(id).status, TaskStatus::Cancelled, "{id}");
        }
        assert!(f.store.ready_tasks(u64::MAX, 10).expect("ready").is_empty());
        assert!(f
            .store
            .leased_tasks(u64::MAX, 10)
            .expect("leased")
            .is_empty());
        assert!(f.store.tasks_on_host("h1").expect("h1").is_empty());
        assert!(conflict(f.succeed("a", ta)).starts_with("stale fencing token"));
        assert!(conflict(f.assign("c", "h1", 1)).contains("cancelled"));
        assert!(conflict(f.jobs(JobsCommand::CancelJob {
            job_id: "j1".into(),
            by: "bob".into(),
        }))
        .contains("already ended with FAIL"));
        assert!(matches!(
            f.jobs(JobsCommand::CancelJob {
                job_id: "nope".into(),
                by: "bob".into(),
            }),
            Err(CommandError::NotFound { .. })
        ));
    }

    fn group_job() -> NewJob {
        let mut parent = new_job("g", vec![]);
        parent.job_type = "failoverProtectionGroupNoCG".into();
        parent.sub_jobs = vec![
            new_job("g1", vec![sleep_task("g1a", &[], 1)]),
            new_job("g2", vec![sleep_task("g2a", &[], 1)]),
        ];
        parent
    }

    #[test]
    fn sub_jobs_succeed_into_their_parent() {
        let f = fixture();
        let parent = f.create(group_job());
        assert_eq!(parent.sub_jobs, vec!["g1", "g2"]);
        assert_eq!(f.job("g1").parent_id.as_deref(), Some("g"));
        let t1 = f.assign_ok("g1a", "h1", 1);
        assert_eq!(f.job("g").status, JobStatus::Running);
        f.succeed("g1a", t1).expect("g1a");
        assert_eq!(f.job("g1").status, JobStatus::Success);
        assert_eq!(f.job("g").status, JobStatus::Running);
        let t2 = f.assign_ok("g2a", "h1", 1);
        f.succeed("g2a", t2).expect("g2a");
        assert_eq!(f.job("g").status, JobStatus::Success);
    }

    #[test]
    fn a_failed_sub_job_fails_the_parent_and_cancels_its_siblings() {
        let f = fixture();
        f.create(group_job());
        let t1 = f.assign_ok("g1a", "h1", 1);
        f.fail("g1a", t1, "boom").expect("report");
        let g1 = f.job("g1");
        assert_eq!(g1.status, JobStatus::Fail);
        let g = f.job("g");
        assert_eq!(g.status, JobStatus::Fail);
        assert_eq!(g.error_code.as_deref(), Some(ERROR_SUB_JOB_FAILED));
        assert!(g
            .fail_reason
            .expect("reason")
            .contains("sub-job 'g1' failed"));
        let g2 = f.job("g2");
        assert_eq!(g2.status, JobStatus::Fail);
        assert_eq!(g2.error_code.as_deref(), Some(ERROR_CANCELLED));
        assert_eq!(f.task("g2a").status, TaskStatus::Cancelled);
    }

    #[test]
    fn a_jobs_reservations_are_released_when_it_ends() {
        let f = fixture();
        f.create(new_job("j1", vec![sleep_task("a", &[], 1)]));
        f.inv(InventoryCommand::Reserve {
            host: "h1".into(),
            holder: "j1".into(),
            resources: ResourceAmount {
                vcpus: 2,
                ram_mb: 1024,
                ..Default::default()
            },
        })
        .expect("reserve");
        assert_eq!(f.store.reservations_of("j1").expect("res").len(), 1);
        let tok = f.assign_ok("a", "h1", 1);
        f.succeed("a", tok).expect("done");
        assert!(f.store.reservations_of("j1").expect("res").is_empty());
        let h1 = f.store.get_host("h1").expect("read").expect("h1");
        assert!(h1.reservations.is_empty());
    }

    #[test]
    fn finished_jobs_are_kept_a_day_then_purged() {
        let mut f = fixture();
        f.create(new_job("old", vec![sleep_task("o", &[], 1)]));
        let tok = f.assign_ok("o", "h1", 1);
        f.succeed("o", tok).expect("done");
        let ended = f.now;
        f.create(new_job("running", vec![sleep_task("r", &[], 1)]));

        f.now = ended + JOB_RETENTION_MS;
        f.apply(Command::Noop).expect("noop");
        assert!(
            f.store.get_job("old").expect("read").is_some(),
            "kept for 24 h"
        );

        f.now = ended + JOB_RETENTION_MS + 1;
        f.apply(Command::Noop).expect("noop");
        assert!(f.store.get_job("old").expect("read").is_none(), "purged");
        assert!(f.store.get_task("o").expect("read").is_none());
        let listed: Vec<String> = f
            .store
            .list_jobs(&JobFilter::default(), None, 100)
            .expect("list")
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(listed, vec!["running"], "unfinished jobs are never purged");
        // The purge queue is empty again: only the running job's index entries remain.
        assert!(f
            .store
            .scan_keys(CF_JOBS_FINISHED, b"", 10)
            .expect("keys")
            .is_empty());
    }

    #[test]
    fn purge_is_bounded_per_entry() {
        let mut f = fixture();
        let n = PURGE_PER_ENTRY + 3;
        for i in 0..n {
            let id = format!("j{i}");
            f.create(new_job(&id, vec![sleep_task(&format!("t{i}"), &[], 1)]));
            f.jobs(JobsCommand::CancelJob {
                job_id: id,
                by: "test".into(),
            })
            .expect("cancel");
        }
        f.now += JOB_RETENTION_MS + 1;
        f.apply(Command::Noop).expect("noop");
        let left = f
            .store
            .list_jobs(&JobFilter::default(), None, 100)
            .expect("list");
        assert_eq!(left.len(), 3);
        f.apply(Command::Noop).expect("noop");
        assert!(f
            .store
            .list_jobs(&JobFilter::default(), None, 100)
            .expect("list")
            .is_empty());
    }

    #[test]
    fn list_jobs_filters_and_pages_newest_first() {
        let mut f = fixture();
        for (i, project) in ["p1", "p2", "p1", "p1"].iter().enumerate() {
            let mut j = new_job(&format!("j{i}"), vec![sleep_task(&format!("t{i}"), &[], 1)]);
            j.project = project.to_string();
            if i == 3 {
                j.job_type = "other".into();
            }
            f.create(j);
            f.now += 1;
        }
        f.jobs(JobsCommand::CancelJob {
            job_id: "j2".into(),
            by: "x".into(),
        })
        .expect("cancel");
        let ids = |filter: &JobFilter, marker: Option<&str>, limit: usize| -> Vec<String> {
            f.store
                .list_jobs(filter, marker, limit)
                .expect("list")
                .into_iter()
                .map(|j| j.id)
                .collect()
        };
        let all = JobFilter::default();
        assert_eq!(ids(&all, None, 10), vec!["j3", "j2", "j1", "j0"]);
        assert_eq!(ids(&all, None, 2), vec!["j3", "j2"]);
        assert_eq!(ids(&all, Some("j2"), 2), vec!["j1", "j0"]);
        assert_eq!(ids(&all, Some("j0"), 2), Vec::<String>::new());
        assert_eq!(ids(&all, Some("missing"), 2), Vec::<String>::new());
        let p1 = JobFilter {
            project: Some("p1".into()),
            ..Default::default()
        };
        assert_eq!(ids(&p1, None, 10), vec!["j3", "j2", "j0"]);
        assert_eq!(ids(&p1, Some("j3"), 1), vec!["j2"]);
        let failed = JobFilter {
            status: Some(JobStatus::Fail),
            ..Default::default()
        };
        assert_eq!(ids(&failed, None, 10), vec!["j2"]);
        let typed = JobFilter {
            project: Some("p1".into()),
            job_type: Some("test".into()),
            ..Default::default()
        };
        assert_eq!(ids(&typed, None, 10), vec!["j2", "j0"]);
        let tasks: Vec<String> = f
            .store
            .job_tasks("j1")
            .expect("tasks")
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(tasks, vec!["t1"]);
    }

    /// A scripted history covering every command, applied as the same entries to two
    /// stores: the exports must be byte-identical.
    #[test]
    fn applying_the_same_entries_gives_identical_state() {
        use crate::command::{Proposal, ProposalBatch};
        let script: Vec<(u64, Vec<Command>)> = {
            let reg = |n: &str| {
                Command::Inventory(InventoryCommand::RegisterHost(Box::new(registration(
                    n, "s1",
                ))))
            };
            let tok = |term, attempt| FencingToken { term, attempt };
            vec![
                (
                    T0,
                    vec![
                        Command::CreateSite {
                            name: "s1".into(),
                            description: String::new(),
                        },
                        reg("h1"),
                        reg("h2"),
                        Command::Jobs(JobsCommand::CreateJob(Box::new(new_job(
                            "j1",
                            vec![sleep_task("a", &[], 3), sleep_task("b", &["a"], 3)],
                        )))),
                        Command::Jobs(JobsCommand::CreateJob(Box::new(group_job()))),
                    ],
                ),
                (
                    T0 + 10,
                    vec![
                        Command::Jobs(JobsCommand::AssignTask {
                            task_id: "a".into(),
                            host: "h1".into(),
                            term: 1,
                            lease_until_ms: T0 + 1000,
                        }),
                        Command::Inventory(InventoryCommand::Reserve {
                            host: "h2".into(),
                            holder: "g".into(),
                            resources: ResourceAmount {
                                vcpus: 1,
                                ..Default::default()
                            },
                        }),
                        Command::Jobs(JobsCommand::AssignTask {
                            task_id: "g1a".into(),
                            host: "h2".into(),
                            term: 1,
                            lease_until_ms: T0 + 1000,
                        }),
                    ],
                ),
                (
                    T0 + 2000,
                    vec![Command::Jobs(JobsCommand::ExpireLeases { limit: 100 })],
                ),
                (
                    T0 + 2001,
                    vec![
                        Command::Jobs(JobsCommand::AssignTask {
                            task_id: "a".into(),
                            host: "h2".into(),
                            term: 2,
                            lease_until_ms: T0 + 9000,
                        }),
                        Command::Jobs(JobsCommand::ReportResult {
                            task_id: "a".into(),
                            token: tok(1, 1),
                            outcome: TaskOutcome::Succeeded {
                                output: BTreeMap::new(),
                            },
                        }),
                        Command::Jobs(JobsCommand::ReportResult {
                            task_id: "a".into(),
                            token: tok(2, 2),
                            outcome: TaskOutcome::Failed {
                                reason: "flaky".into(),
                                retryable: true,
                            },
                        }),
                        Command::Jobs(JobsCommand::CancelJob {
                            job_id: "g".into(),
                            by: "ops".into(),
                        }),
                    ],
                ),
                (
                    T0 + 5000,
                    vec![Command::Jobs(JobsCommand::AssignTask {
                        task_id: "a".into(),
                        host: "h1".into(),
                        term: 2,
                        lease_until_ms: T0 + 9000,
                    })],
                ),
                (
                    T0 + 5001,
                    vec![Command::Jobs(JobsCommand::ReportResult {
                        task_id: "a".into(),
                        token: tok(2, 3),
                        outcome: TaskOutcome::Succeeded {
                            output: BTreeMap::from([("bytes".into(), "42".into())]),
                        },
                    })],
                ),
                (T0 + JOB_RETENTION_MS + 6000, vec![Command::Noop]),
            ]
        };
        let run = || {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path()).expect("open");
            let mut results = Vec::new();
            for (i, (time_ms, commands)) in script.iter().enumerate() {
                let batch = ProposalBatch {
                    time_ms: *time_ms,
                    proposals: commands
                        .iter()
                        .map(|c| Proposal {
                            request_id: Some(format!("r{i}-{}", c.kind())),
                            command: c.clone(),
                        })
                        .collect(),
                };
                results.extend(
                    store
                        .apply_entry(Some(&batch), format!("meta{i}").as_bytes())
                        .expect("apply"),
                );
            }
            let snapshot = store.export_snapshot().expect("export");
            (results, snapshot, dir)
        };
        let (r1, s1, _d1) = run();
        let (r2, s2, _d2) = run();
        assert_eq!(r1, r2);
        assert_eq!(s1, s2, "exports are byte-identical");
        // The history did what it says: a stale report refused, the job finished.
        assert!(
            matches!(&r1[10], Err(CommandError::Conflict(m)) if m.starts_with("stale fencing token"))
        );
        assert!(r1
            .iter()
            .all(|r| !matches!(r, Err(CommandError::Invalid { .. }))));
    }
}
