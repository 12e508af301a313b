//! The Raft log in RocksDB.
//!
//! `append` writes all the entries of one call in one synced `WriteBatch` (WAL fsync) and
//! only then tells openraft they are durable. Many client writes share each sync: the
//! proposal batcher (`node.rs`) packs up to 1024 proposals into one entry on the leader,
//! and a follower's append carries up to 512 entries. Votes, truncations and purges are
//! synced writes too.
//!
//! Why no separate flusher thread: openraft 0.9 awaits each append's flush inside its core
//! loop, so a flusher never saw two appends at once (its batch histogram read 1 for every
//! sync) and only added two thread switches to every write's critical path. When the
//! leader sends the entries eagerly to followers (`eager.rs`), `append` yields once before
//! the sync so that the send tasks it spawned run first. (The sync on a blocking thread
//! instead was slower: c=1 p50 0.86 / 0.82 / 0.83 against 0.77 / 0.78 / 0.78 ms.)
//!
//! Column families: `logs` (big-endian index -> versioned bincode of the entry), `state`
//! (vote, committed log id, last purged log id) and `scratch` (see [`prime_wal_recycling`]).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use drplane_statemachine::codec::{decode, encode};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageIOError, Vote};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use crate::eager::EagerAppend;
use crate::metrics::Metrics;
use crate::{any_err, LogId, StorageError, TypeConfig};

const CF_LOGS: &str = "logs";
const CF_STATE: &str = "state";
const CF_SCRATCH: &str = "scratch";
/// WAL files primed for recycling at open, and the size each is filled to (about one
/// memtable of the `logs` family, which is when RocksDB starts the next WAL).
const PRIMED_WALS: usize = 4;
const PRIMED_WAL_BYTES: usize = 2 << 20;
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"purged";

type Entry = openraft::Entry<TypeConfig>;

/// The RocksDB-backed Raft log store; clones share the same database.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    metrics: Arc<Metrics>,
    /// Highest committed index this node has learned (u64::MAX = none), for readiness.
    committed: AtomicU64,
    /// The committed log id as openraft last saved it, and whether the stored copy is
    /// behind it: it is written with the next synced append, not on its own.
    committed_id: Mutex<(Option<LogId>, bool)>,
    /// Set on nodes that send new entries to followers before their own sync.
    eager: std::sync::OnceLock<Arc<EagerAppend>>,
}

impl LogStore {
    /// Open (or create) the log store in `path`.
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<Self, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Every append ends in a WAL fdatasync. Into a new WAL file (allocated as it grows)
        // that sync also commits ext4's journal; into a recycled one, overwritten in place,
        // it writes the data blocks only (see `prime_wal_recycling` for figures). Small
        // memtables and a small WAL cap make WALs obsolete, and so recycled, every few MiB
        // of log; atomic flush flushes every family whenever one does, because the tiny
        // `state` family otherwise kept each WAL alive until the cap forced it out, and
        // most new WALs found the recycle pool empty (RocksDB's LOG: logs #20 and #22
        // created fresh while #16 waited for `state`).
        opts.set_recycle_log_file_num(PRIMED_WALS);
        opts.set_max_total_wal_size(4 << 20);
        opts.set_atomic_flush(true);
        let cfs = [CF_LOGS, CF_STATE, CF_SCRATCH].into_iter().map(|n| {
            let mut cf = Options::default();
            cf.set_write_buffer_size(2 << 20);
            ColumnFamilyDescriptor::new(n, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)
            .map_err(|e| StorageIOError::read_logs(any_err(e)))?;
        prime_wal_recycling(&db).map_err(|e| StorageIOError::write_logs(any_err(e)))?;
        let db = Arc::new(db);
        let store = LogStore {
            inner: Arc::new(Inner {
                db,
                metrics,
                committed: AtomicU64::new(u64::MAX),
                committed_id: Mutex::new((None, false)),
                eager: std::sync::OnceLock::new(),
            }),
        };
        if let Some(c) = store.read_state::<LogId>(KEY_COMMITTED)? {
            store.inner.committed.store(c.index, Ordering::Relaxed);
            *store.committed_id() = (Some(c), false);
        }
        Ok(store)
    }

    fn committed_id(&self) -> std::sync::MutexGuard<'_, (Option<LogId>, bool)> {
        self.inner
            .committed_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Add the committed log id to `batch` if the stored copy is behind it. Returns what
    /// to mark as stored once the batch is written.
    fn add_committed(&self, batch: &mut WriteBatch) -> Result<Option<LogId>, StorageError> {
        let (id, dirty) = *self.committed_id();
        let Some(id) = id.filter(|_| dirty) else {
            return Ok(None);
        };
        batch.put_cf(
            self.cf(CF_STATE)?,
            KEY_COMMITTED,
            encode(&id).map_err(|e| StorageIOError::write(any_err(e)))?,
        );
        Ok(Some(id))
    }

    fn committed_stored(&self, stored: Option<LogId>) {
        let mut c = self.committed_id();
        if stored.is_some() && c.0 == stored {
            c.1 = false;
        }
    }

    /// Send entries this node appends as leader to caught-up followers before syncing
    /// them (`eager.rs`). Set once, before Raft starts.
    pub fn set_eager(&self, eager: Arc<EagerAppend>) {
        let _ = self.inner.eager.set(eager);
    }

    /// Highest committed index this node has learned, if any.
    pub fn committed_index(&self) -> Option<u64> {
        match self.inner.committed.load(Ordering::Relaxed) {
            u64::MAX => None,
            i => Some(i),
        }
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.inner.db.cf_handle(name).ok_or_else(|| {
            StorageIOError::read_logs(openraft::AnyError::error(format!(
                "missing column family {name}"
            )))
            .into()
        })
    }

    fn read_state<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let cf = self.cf(CF_STATE)?;
        match self
            .inner
            .db
            .get_cf(cf, key)
            .map_err(|e| StorageIOError::read(any_err(e)))?
        {
            Some(b) => Ok(Some(
                decode(&b).map_err(|e| StorageIOError::read(any_err(e)))?,
            )),
            None => Ok(None),
        }
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.inner.db.write_opt(batch, &wo)
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.read_state(KEY_PURGED)
    }

    /// The id of the last entry in the log (or of the last purged one when the log is
    /// empty behind a snapshot): what a vote compares.
    pub fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let cf = self.cf(CF_LOGS)?;
        let last = match self.inner.db.iterator_cf(cf, IteratorMode::End).next() {
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(any_err(e)))?;
                let entry: Entry = decode(&v).map_err(|e| StorageIOError::read_logs(any_err(e)))?;
                Some(entry.log_id)
            }
            None => None,
        };
        Ok(last.or(self.last_purged()?))
    }
}

/// Fill RocksDB's pool of recyclable WAL files at open.
///
/// Every append ends in a WAL fdatasync. Into a fresh WAL file that sync also commits
/// ext4's journal (the file grows, or its preallocated extents turn written); into a
/// recycled file, overwritten in place, it writes the data block only: p50 0.19 -> 0.13 ms
/// here. RocksDB recycles only WALs made obsolete while it runs, so a new or restarted
/// node would pay the slow sync for its first few MiB of log. Each round writes about one
/// WAL's worth of log-only records (`put_log_data`: in the WAL, not in any memtable) and
/// one key into `scratch`, then flushes `scratch`: RocksDB starts a new WAL, and the old
/// one, holding nothing unflushed, joins the recycle pool. About 40 ms per open.
fn prime_wal_recycling(db: &DB) -> Result<(), rocksdb::Error> {
    let Some(cf) = db.cf_handle(CF_SCRATCH) else {
        return Ok(());
    };
    let filler = vec![0u8; 64 << 10];
    for round in 0..=PRIMED_WALS {
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, b"primed", (round as u64).to_be_bytes());
        for _ in 0..PRIMED_WAL_BYTES / filler.len() {
            batch.put_log_data(&filler);
        }
        db.write(batch)?;
        db.flush_cf(cf)?;
    }
    Ok(())
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Option<u64> {
    let b: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + openraft::OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let cf = self.cf(CF_LOGS)?;
        let mut out = Vec::new();
        let iter = self.inner.db.iterator_cf(
            cf,
            IteratorMode::From(&index_key(start), Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(any_err(e)))?;
            let Some(index) = key_index(&k) else { break };
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = decode(&v).map_err(|e| StorageIOError::read_logs(any_err(e)))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        Ok(LogState {
            last_purged_log_id: self.last_purged()?,
            last_log_id: self.last_log_id()?,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let cf = self.cf(CF_STATE)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            cf,
            KEY_VOTE,
            encode(vote).map_err(|e| StorageIOError::write_vote(any_err(e)))?,
        );
        self.write_synced(batch)
            .map_err(|e| StorageIOError::write_vote(any_err(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_state(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Kept in memory and written with the next synced append: the committed index is
        // a hint that speeds up restart (losing its tail only means re-learning it from
        // the leader), and a write of its own sat on every commit's critical path.
        match committed {
            Some(c) => self.inner.committed.store(c.index, Ordering::Relaxed),
            None => self.inner.committed.store(u64::MAX, Ordering::Relaxed),
        }
        *self.committed_id() = (committed, committed.is_some());
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.committed_id().0)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let cf = self.cf(CF_LOGS)?;
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut batch = WriteBatch::default();
        for entry in &entries {
            let bytes = encode(entry).map_err(|e| StorageIOError::write_logs(any_err(e)))?;
            batch.put_cf(cf, index_key(entry.log_id.index), bytes);
        }
        let count = entries.len();
        let committed = self.add_committed(&mut batch)?;
        // On the leader, caught-up followers get these entries now, while this sync runs
        // (`eager.rs`).
        let leader_commit = self.committed_id().0;
        let eager = self
            .inner
            .eager
            .get()
            .is_some_and(|e| e.send(&entries, leader_commit));
        drop(entries);
        // One synced write: the entries and the WAL fsync that makes them durable. openraft
        // 0.9 awaits this flush inside its core loop before it replicates or appends again,
        // so without eager sends, handing the sync to another thread would only add two
        // thread switches to every write's critical path (measured: each hand-off batch
        // held one append). Many client writes still share one sync: the proposal batcher
        // packs up to 1024 proposals into one entry, and a follower's append carries up
        // to 512 entries.
        let started = Instant::now();
        if eager {
            // Let this worker run the send tasks just spawned (they sit in its LIFO slot,
            // which other workers cannot steal) before it blocks in the sync.
            tokio::task::yield_now().await;
        }
        let result = self.write_synced(batch).map_err(|e| e.to_string());
        self.inner
            .metrics
            .log_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        self.inner.metrics.log_sync_batch.observe(count as f64);
        match result {
            Ok(()) => {
                self.committed_stored(committed);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "raft log append failed");
                callback.log_io_completed(Err(std::io::Error::other(e.clone())));
                Err(StorageIOError::write_logs(any_err(std::io::Error::other(e))).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let cf = self.cf(CF_LOGS)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, index_key(log_id.index), index_key(u64::MAX));
        batch.delete_cf(cf, index_key(u64::MAX));
        self.write_synced(batch)
            .map_err(|e| StorageIOError::write_logs(any_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let logs = self.cf(CF_LOGS)?;
        let state = self.cf(CF_STATE)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            state,
            KEY_PURGED,
            encode(&log_id).map_err(|e| StorageIOError::write_logs(any_err(e)))?,
        );
        batch.delete_range_cf(
            logs,
            index_key(0),
            index_key(log_id.index.saturating_add(1)),
        );
        self.write_synced(batch)
            .map_err(|e| StorageIOError::write_logs(any_err(e)).into())
    }
}
