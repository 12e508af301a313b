//! The openraft state machine adapter over the `statemachine` crate's store.
//!
//! Each entry is applied with its own write batch that also records the applied meta
//! (last-applied log id and last membership), so the store is always at an entry boundary.
//! Snapshots are consistent RocksDB snapshots of every column family; the current one is
//! kept in `snapshot.bin` (written to a temporary file, synced, renamed) so a restarted node
//! can serve it without rebuilding.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use drplane_statemachine::codec::{decode, encode};
use drplane_statemachine::Store;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::{any_err, Applied, LogId, NodeInfo, StorageError, StoredMembership, TypeConfig};

/// What the adapter writes beside every applied entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedMeta {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, NodeInfo>,
    data: Vec<u8>,
}

/// The state machine as openraft sees it.
pub struct StateMachine {
    store: Store,
    meta: AppliedMeta,
    snapshot_path: PathBuf,
    current: Arc<Mutex<Option<Arc<StoredSnapshot>>>>,
    snapshot_seq: Arc<AtomicU64>,
}

impl StateMachine {
    /// Wrap `store`; the current snapshot lives in `snapshot_dir/snapshot.bin`.
    pub fn new(store: Store, snapshot_dir: &Path) -> Result<Self, StorageError> {
        let meta = match store
            .applied_meta()
            .map_err(|e| StorageIOError::read_state_machine(any_err(e)))?
        {
            Some(b) => decode(&b).map_err(|e| StorageIOError::read_state_machine(any_err(e)))?,
            None => AppliedMeta::default(),
        };
        let snapshot_path = snapshot_dir.join("snapshot.bin");
        let current = match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                Some(Arc::new(decode::<StoredSnapshot>(&bytes).map_err(|e| {
                    StorageIOError::read_snapshot(None, any_err(e))
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StorageIOError::read_snapshot(None, any_err(e)).into()),
        };
        Ok(StateMachine {
            store,
            meta,
            snapshot_path,
            current: Arc::new(Mutex::new(current)),
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Write `bytes` to `path` atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Builds a snapshot from a consistent view of the store.
pub struct SnapshotBuilder {
    store: Store,
    snapshot_path: PathBuf,
    current: Arc<Mutex<Option<Arc<StoredSnapshot>>>>,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let store = self.store.clone();
        let (data, meta_bytes) = tokio::task::spawn_blocking(move || {
            // Everything applied so far becomes durable before the log behind it is purged.
            store.flush_durable()?;
            store.export_snapshot()
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, any_err(e)))?
        .map_err(|e| StorageIOError::write_snapshot(None, any_err(e)))?;
        let applied: AppliedMeta = match meta_bytes {
            Some(b) => decode(&b).map_err(|e| StorageIOError::write_snapshot(None, any_err(e)))?,
            None => AppliedMeta::default(),
        };
        let snapshot_id = match &applied.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
            snapshot_id,
        };
        let stored = Arc::new(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        let bytes = encode(&*stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any_err(e)))?;
        let path = self.snapshot_path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any_err(e)))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any_err(e)))?;
        *self.current.lock().await = Some(stored.clone());
        tracing::info!(snapshot = %meta.snapshot_id, bytes = stored.data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data.clone())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.meta.last_applied, self.meta.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            self.meta.last_applied = Some(entry.log_id);
            let batch = match &entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(b) => Some(b),
                EntryPayload::Membership(m) => {
                    self.meta.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    None
                }
            };
            let meta =
                encode(&self.meta).map_err(|e| StorageIOError::write_state_machine(any_err(e)))?;
            let results = self
                .store
                .apply_entry(batch, &meta)
                .map_err(|e| StorageIOError::write_state_machine(any_err(e)))?;
            out.push(Applied(results));
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            snapshot_path: self.snapshot_path.clone(),
            current: self.current.clone(),
            seq: self.snapshot_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let applied = AppliedMeta {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let sig = meta.signature();
        let meta_bytes = encode(&applied)
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), any_err(e)))?;
        let stored = Arc::new(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        let file_bytes = encode(&*stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), any_err(e)))?;
        let store = self.store.clone();
        let path = self.snapshot_path.clone();
        let stored2 = stored.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            store
                .install_snapshot(&stored2.data, &meta_bytes)
                .map_err(|e| e.to_string())?;
            write_atomic(&path, &file_bytes).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), any_err(e)))?
        .map_err(|e| {
            StorageIOError::write_snapshot(Some(sig.clone()), openraft::AnyError::error(e))
        })?;
        self.meta = applied;
        *self.current.lock().await = Some(stored);
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.current.lock().await.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
