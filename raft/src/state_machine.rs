//! The openraft state machine adapter over the `statemachine` crate's store.
//!
//! Each entry is applied with its own write batch that also records the applied meta
//! (last-applied log id and last membership), so the store is always at an entry boundary.
//!
//! Snapshots are not copied into files. The store already lives in RocksDB on disk, so
//! building a snapshot (every `snapshot_logs` entries) only syncs the store's WAL and
//! records the applied point: the log behind it can then be purged. The bytes are exported
//! from a consistent RocksDB snapshot, on a blocking thread, only when openraft asks for
//! the current snapshot to send to a lagging follower. (Serialising and fsyncing the whole
//! state at every build cost every node a 111 MB write at once after 20,000 entries and
//! showed as the 256-connection p99 tail.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use drplane_statemachine::codec::{decode, encode};
use drplane_statemachine::Store;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::snapshot_data::SnapshotData;
use crate::{any_err, Applied, LogId, NodeInfo, StorageError, StoredMembership, TypeConfig};

/// What the adapter writes beside every applied entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedMeta {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

type Meta = SnapshotMeta<u64, NodeInfo>;

/// The state machine as openraft sees it.
pub struct StateMachine {
    store: Store,
    meta: AppliedMeta,
    /// The last snapshot point built or installed (none until the first).
    current: Arc<Mutex<Option<Meta>>>,
    snapshot_seq: Arc<AtomicU64>,
}

impl StateMachine {
    /// Wrap `store`. Until a snapshot is built or installed there is no current snapshot;
    /// after a restart openraft builds one at once if the log was purged.
    pub fn new(store: Store) -> Result<Self, StorageError> {
        let meta = match store
            .applied_meta()
            .map_err(|e| StorageIOError::read_state_machine(any_err(e)))?
        {
            Some(b) => decode(&b).map_err(|e| StorageIOError::read_state_machine(any_err(e)))?,
            None => AppliedMeta::default(),
        };
        Ok(StateMachine {
            store,
            meta,
            current: Arc::new(Mutex::new(None)),
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

fn snapshot_id(last: &Option<LogId>, seq: u64) -> String {
    match last {
        Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, seq),
        None => format!("0-0-{seq}"),
    }
}

/// Make `meta` the current snapshot point unless a later one is already there (a build
/// and an install may finish in either order).
fn set_current(current: &Mutex<Option<Meta>>, meta: &Meta) {
    let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
    if cur
        .as_ref()
        .is_none_or(|c| c.last_log_id <= meta.last_log_id)
    {
        *cur = Some(meta.clone());
    }
}

/// Fixes a snapshot point: the applied meta, made durable.
pub struct SnapshotBuilder {
    store: Store,
    current: Arc<Mutex<Option<Meta>>>,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let store = self.store.clone();
        let meta_bytes = tokio::task::spawn_blocking(move || {
            // Read the point first, then sync the WAL: everything up to the point is then
            // durable, and openraft may purge the log behind it.
            let meta = store.applied_meta()?;
            store.flush_durable()?;
            Ok::<_, drplane_statemachine::StoreError>(meta)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, any_err(e)))?
        .map_err(|e| StorageIOError::write_snapshot(None, any_err(e)))?;
        let applied: AppliedMeta = match meta_bytes {
            Some(b) => decode(&b).map_err(|e| StorageIOError::write_snapshot(None, any_err(e)))?,
            None => AppliedMeta::default(),
        };
        let meta = SnapshotMeta {
            snapshot_id: snapshot_id(&applied.last_applied, self.seq),
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
        };
        set_current(&self.current, &meta);
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot point built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::meta_only()),
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
            current: self.current.clone(),
            seq: self.snapshot_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::new(SnapshotData::from_bytes(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let sig = meta.signature();
        let data = snapshot
            .into_bytes()
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(sig.clone()), any_err(e)))?;
        let applied = AppliedMeta {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let meta_bytes = encode(&applied)
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), any_err(e)))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.install_snapshot(&data, &meta_bytes))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), any_err(e)))?
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), any_err(e)))?;
        self.meta = applied;
        set_current(&self.current, meta);
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    /// The state as applied now, exported in the background; the metadata is that of the
    /// last built point when nothing was applied since. Runs in openraft's state machine
    /// worker, so no entry is applied while the RocksDB snapshot is being taken.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let built = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(built) = built else {
            return Ok(None);
        };
        let meta = if built.last_log_id == self.meta.last_applied {
            built
        } else {
            SnapshotMeta {
                snapshot_id: snapshot_id(
                    &self.meta.last_applied,
                    self.snapshot_seq.fetch_add(1, Ordering::Relaxed),
                ),
                last_log_id: self.meta.last_applied,
                last_membership: self.meta.membership.clone(),
            }
        };
        let (taken_tx, taken_rx) = oneshot::channel::<()>();
        let (data_tx, data_rx) = oneshot::channel();
        let store = self.store.clone();
        let expected = meta.last_log_id;
        let id = meta.snapshot_id.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let exported = store.export_snapshot_when(
                move || {
                    let _ = taken_tx.send(());
                },
                || !data_tx.is_closed(),
            );
            let result = match exported {
                Ok(Some((data, meta_bytes))) => {
                    let at: Option<LogId> = meta_bytes
                        .as_deref()
                        .and_then(|b| decode::<AppliedMeta>(b).ok())
                        .and_then(|m| m.last_applied);
                    if at == expected {
                        tracing::info!(snapshot = %id, bytes = data.len(), ms = started.elapsed().as_millis() as u64, "exported snapshot");
                        Ok(data)
                    } else {
                        Err(std::io::Error::other(format!(
                            "snapshot {id}: store was at {at:?}, expected {expected:?}"
                        )))
                    }
                }
                Ok(None) => return,
                Err(e) => Err(std::io::Error::other(format!(
                    "exporting snapshot {id}: {e}"
                ))),
            };
            let _ = data_tx.send(result);
        });
        // The export's point in time is fixed once the RocksDB snapshot exists; if the
        // exporter failed before that, the data reports its error to whoever reads it.
        let _ = taken_rx.await;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::exporting(data_rx)),
        }))
    }
}
