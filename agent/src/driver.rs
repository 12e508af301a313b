//! The operations the scheduler's tasks need on one host, behind one trait.
//!
//! Two implementations: [`crate::fs::FsDriver`] keeps real data in files under the agent's
//! data directory and syncs it over gRPC; [`crate::sim::SimDriver`] keeps sizes and
//! versions in memory for scale tests.
//!
//! Every operation is idempotent where a retried task needs it to be: creating a volume
//! that exists with the same spec returns it, deleting a missing volume succeeds, fencing a
//! fenced volume and promoting a writable one do nothing, and a sync brings the target to
//! the source's current content however often it runs.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Errors callers branch on. `Io` and `Remote` carry context for the failure reason a
/// user reads; the others map to a decision (retry elsewhere, fail the job, wait).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("pool {pool}: {needed} bytes needed, {free} free")]
    NoSpace {
        pool: String,
        needed: u64,
        free: u64,
    },
    #[error("volume {0} is fenced (read-only); promote it first")]
    Fenced(String),
    /// A sync target must be a read-only replica: syncing into a writable volume would
    /// overwrite a primary. Fence it first (reverse and reinit do).
    #[error("volume {0} is writable; only a fenced replica can be a sync target")]
    TargetWritable(String),
    #[error("volume {id} exists with a different spec: {detail}")]
    AlreadyExists { id: String, detail: String },
    #[error("volume {0} is busy with another sync")]
    Busy(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The other agent refused or the connection to it failed.
    #[error("remote {endpoint}: {message}")]
    Remote { endpoint: String, message: String },
    /// Data does not match its checksum, a journal or manifest is malformed, or the source
    /// violated the protocol. The target keeps its previous copy.
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("cancelled")]
    Cancelled,
    /// A failure injected by the simulated driver.
    #[error("injected failure: {0}")]
    Injected(String),
}

impl DriverError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DriverError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DriverError::Io { .. }
                | DriverError::Remote { .. }
                | DriverError::Busy(_)
                | DriverError::Corrupt(_)
                | DriverError::Injected(_)
        )
    }
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

/// Attach a context to an `std::io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| DriverError::io(what(), e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeKind {
    /// A server's disk: one raw image file.
    Disk,
    /// A file share: a directory tree.
    Share,
    /// A database instance's volume: one raw file.
    Database,
}

impl VolumeKind {
    /// Disks and database volumes are one file; shares are a tree.
    pub fn is_file(self) -> bool {
        !matches!(self, VolumeKind::Share)
    }
}

impl fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VolumeKind::Disk => "disk",
            VolumeKind::Share => "share",
            VolumeKind::Database => "database",
        })
    }
}

/// What to create. `id` is unique on the host: 1-128 of `[A-Za-z0-9._-]`, not starting
/// with a dot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub id: String,
    pub kind: VolumeKind,
    pub pool: String,
    /// Disk/database: the image size. Share: its quota (counted against the pool).
    pub size_bytes: u64,
    /// Allocate the space now (thick) instead of on write (thin). Both count against the
    /// pool's capacity.
    #[serde(default)]
    pub reserve: bool,
    /// Create it fenced: a replica target that only a sync writes to.
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: String,
    pub kind: VolumeKind,
    pub pool: String,
    /// Disk/database: the image's length. Share: the sum of its files' lengths.
    pub size_bytes: u64,
    /// What the volume counts against its pool (the spec's size, or the content if larger).
    pub provisioned_bytes: u64,
    /// Bytes the filesystem has allocated (0 for the simulated driver).
    pub allocated_bytes: u64,
    pub reserved: bool,
    pub fenced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

/// What an agent reports at registration and on change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// "fs" or "sim".
    pub driver: String,
    pub pools: Vec<PoolInfo>,
    pub volumes: Vec<VolumeInfo>,
}

/// A volume on another agent, reached through that agent's sync endpoint (from
/// [`SyncServer::endpoint`]: `http://ip:port` for fs, `sim://name` for sim).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSource {
    pub endpoint: String,
    pub volume: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub source: SyncSource,
    /// The local target volume; it must exist and be fenced.
    pub target: String,
    /// Bytes per second of block payload; `None` is unlimited.
    pub bwlimit: Option<u64>,
    /// Defaults to [`DEFAULT_BLOCK_SIZE`].
    pub block_size: Option<u32>,
    /// The scheduler's task id, for spans and the source's logs.
    pub task_id: Option<String>,
}

impl SyncRequest {
    pub fn new(
        endpoint: impl Into<String>,
        source_volume: impl Into<String>,
        target: impl Into<String>,
    ) -> Self {
        SyncRequest {
            source: SyncSource {
                endpoint: endpoint.into(),
                volume: source_volume.into(),
            },
            target: target.into(),
            bwlimit: None,
            block_size: None,
            task_id: None,
        }
    }
}

/// Cold migration: create `target` here (read-only), full sync from `source`, verify, then
/// promote the new copy. The caller fences and deletes the source afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    pub source: SyncSource,
    pub target: VolumeSpec,
    pub bwlimit: Option<u64>,
    pub task_id: Option<String>,
}

pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// Bytes of the source volume compared so far (sent or found equal).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Wire bytes received from the source so far.
    pub bytes_sent: u64,
}

impl SyncProgress {
    pub fn percent(&self) -> f64 {
        if self.bytes_total == 0 {
            100.0
        } else {
            self.bytes_done as f64 * 100.0 / self.bytes_total as f64
        }
    }
}

/// Called from the sync's task at most every 100 ms, and once at the end.
pub type ProgressFn = Arc<dyn Fn(SyncProgress) + Send + Sync>;

/// How the target made the new copy durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyMode {
    /// Changed blocks went to a journal, committed, then written in place.
    Journal,
    /// The target held no data: the copy was written to a new file renamed over it.
    Shadow,
    /// Nothing differed (sim) or nothing was written.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStats {
    /// Bytes of the source volume (sum of its files).
    pub bytes_total: u64,
    /// Encoded bytes the source sent (blocks, manifest, progress, trailer).
    pub bytes_sent: u64,
    /// Block payload bytes among them.
    pub data_bytes: u64,
    pub blocks_total: u64,
    pub blocks_sent: u64,
    /// Bytes of block hashes the target sent to the source.
    pub hash_bytes: u64,
    /// Digest of the copy, equal to the source's.
    pub digest: Digest,
    pub mode: ApplyMode,
    pub elapsed: Duration,
}

/// A 32-byte BLAKE3-based volume digest (see `digest.rs` for its definition).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A workload write through the driver. A fenced volume refuses all of them.
#[derive(Debug, Clone, Copy)]
pub enum WriteOp<'a> {
    /// Disk/database: write `data` at `offset`, growing the image if needed.
    At { offset: u64, data: &'a [u8] },
    /// Share: create or replace the file at `path` (parents are created).
    File { path: &'a str, data: &'a [u8] },
    /// Share: remove the file or directory tree at `path`.
    Remove { path: &'a str },
}

impl WriteOp<'_> {
    pub fn len(&self) -> u64 {
        match self {
            WriteOp::At { data, .. } | WriteOp::File { data, .. } => data.len() as u64,
            WriteOp::Remove { .. } => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A running sync-source service. Dropping it stops serving (syncs in flight fail on the
/// target, which keeps its previous copy).
pub struct SyncServer {
    pub(crate) endpoint: String,
    pub(crate) local_addr: Option<SocketAddr>,
    pub(crate) shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: Option<tokio::task::JoinHandle<()>>,
    /// Run when the handle goes (the sim driver unregisters its endpoint).
    pub(crate) on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl SyncServer {
    /// What other agents pass as [`SyncSource::endpoint`]; advertise it at registration.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stop accepting and abort the syncs being served; returns when the server is gone.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

impl Drop for SyncServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl fmt::Debug for SyncServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncServer")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

#[async_trait]
pub trait Driver: Send + Sync {
    /// "fs" or "sim", as registered with the host.
    fn name(&self) -> &'static str;

    /// Create a volume, or return it if it exists with the same kind, pool and size.
    async fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeInfo>;

    /// Delete a volume and its data. Deleting a missing volume succeeds; fenced replicas
    /// can be deleted.
    async fn delete_volume(&self, id: &str) -> Result<()>;

    async fn volume(&self, id: &str) -> Result<VolumeInfo>;

    /// Pools with their free bytes and every volume, sorted by id.
    async fn inventory(&self) -> Result<Inventory>;

    /// A workload write (demo inventory, tests). `Fenced` on a fenced volume.
    async fn write(&self, id: &str, op: WriteOp<'_>) -> Result<()>;

    /// Serve this host's volumes to syncing targets. fs binds a gRPC server on `bind`
    /// (port 0 picks one); sim registers `sim://<host>` in its network and ignores `bind`.
    async fn serve_sync_source(&self, bind: SocketAddr) -> Result<SyncServer>;

    /// Bring the local fenced volume `req.target` to the content of the source volume,
    /// sending only blocks whose hashes differ. Crash-safe: interrupted at any point
    /// (error, cancel, dropped future, process kill) the target holds its previous copy or
    /// the new one, never a mix. The result is verified against the source's digest.
    async fn sync_from(
        &self,
        req: &SyncRequest,
        progress: Option<ProgressFn>,
        cancel: CancellationToken,
    ) -> Result<SyncStats>;

    /// Make the volume writable (failover: the replica becomes the primary).
    async fn promote(&self, id: &str) -> Result<()>;

    /// Make the volume read-only (the old primary, or a new replica target).
    async fn fence(&self, id: &str) -> Result<()>;

    /// The volume's digest, the same value a sync's source and target agree on.
    async fn checksum(&self, id: &str) -> Result<Digest>;

    /// Cold migration to this host: see [`MigrateRequest`].
    async fn migrate(
        &self,
        req: &MigrateRequest,
        progress: Option<ProgressFn>,
        cancel: CancellationToken,
    ) -> Result<SyncStats>;
}

/// Shared by both drivers: volume ids become directory names.
pub fn validate_volume_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DriverError::InvalidArgument(format!(
            "volume id {id:?}: use 1-128 of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

pub fn validate_pool_name(name: &str) -> Result<()> {
    validate_volume_id(name).map_err(|_| {
        DriverError::InvalidArgument(format!(
            "pool {name:?}: use 1-128 of [A-Za-z0-9._-], not starting with '.'"
        ))
    })
}

pub fn validate_block_size(bs: u32) -> Result<()> {
    if (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) && bs.is_multiple_of(4096) {
        Ok(())
    } else {
        Err(DriverError::InvalidArgument(format!(
            "block size {bs}: a multiple of 4096 in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]"
        )))
    }
}
