//! The state machine's RocksDB store.
//!
//! Column families:
//! - `meta`: the applied meta blob (owned by the Raft adapter: last-applied log id and
//!   membership) and the state machine clock;
//! - `sites`: site name -> [`Site`];
//! - `requests`: request id -> (time, result), for at-most-once application of retries;
//! - `requests_by_time`: (time, request id) -> (), to expire old request ids in order.
//!
//! Each log entry is applied in one `WriteBatch` that also carries the applied meta of that
//! entry, so a crash at any instant leaves the store at some entry boundary, never between.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::txn::Txn;

use crate::codec::{decode, encode};
use crate::command::{Command, CommandResult, Outcome, ProposalBatch};
use crate::error::{CommandError, StoreError};
use crate::model::Site;

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_SITES: &str = "sites";
pub(crate) const CF_REQUESTS: &str = "requests";
pub(crate) const CF_REQUESTS_BY_TIME: &str = "requests_by_time";
/// Every column family, in snapshot order. The index is the CF's tag in a snapshot:
/// append new families at the end, never reorder. Domain modules own their families
/// (e.g. `crate::identity::CFS`) and are listed here once.
pub(crate) fn all_cfs() -> Vec<&'static str> {
    let mut cfs = vec![CF_META, CF_SITES, CF_REQUESTS, CF_REQUESTS_BY_TIME];
    cfs.extend_from_slice(crate::domain::EXTRA_CFS);
    cfs
}

const KEY_APPLIED: &[u8] = b"applied";
const KEY_CLOCK: &[u8] = b"clock";

/// How long a request id is remembered for deduplication.
pub const REQUEST_ID_RETENTION_MS: u64 = 15 * 60 * 1000;
/// At most this many expired request ids are dropped per applied entry.
const REQUEST_EXPIRY_PER_ENTRY: usize = 64;
/// Longest accepted request id.
pub const REQUEST_ID_MAX: usize = 128;

/// A snapshot's bytes and the applied meta (if any) at the same point.
pub type ExportedSnapshot = (Vec<u8>, Option<Vec<u8>>);

/// A handle to the state machine store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Arc<DB>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish()
    }
}

impl Store {
    /// Open (or create) the store in `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_total_wal_size(64 << 20);
        let cfs = all_cfs()
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(Store { db: Arc::new(db) })
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))
    }

    /// The applied meta blob written with the last applied entry, if any.
    pub fn applied_meta(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_META)?, KEY_APPLIED)?)
    }

    /// Apply one log entry: `batch` is `None` for entries without commands (blank,
    /// membership). `meta` is written in the same write batch as the entry's changes.
    /// Returns one result per proposal, in order.
    pub fn apply_entry(
        &self,
        batch: Option<&ProposalBatch>,
        meta: &[u8],
    ) -> Result<Vec<CommandResult>, StoreError> {
        let mut txn = Txn::new(&self.db);
        let mut results = Vec::new();
        if let Some(batch) = batch {
            // The state machine clock never goes backwards, whatever the leaders' clocks do.
            let prev = match txn.get(CF_META, KEY_CLOCK)? {
                Some(b) => decode::<u64>(&b)?,
                None => 0,
            };
            let now = prev.max(batch.time_ms);
            txn.put(CF_META, KEY_CLOCK, encode(&now)?)?;
            self.expire_requests(&mut txn, now)?;
            crate::jobs::purge_finished(&mut txn, now)?;
            crate::identity::purge_expired_tokens(&mut txn, now)?;

            results.reserve(batch.proposals.len());
            for proposal in &batch.proposals {
                let result = match &proposal.request_id {
                    Some(id) if id.len() <= REQUEST_ID_MAX => {
                        if let Some(prior) = txn.get(CF_REQUESTS, id.as_bytes())? {
                            let (_, result): (u64, CommandResult) = decode(&prior)?;
                            result
                        } else {
                            let result = apply_one(&mut txn, &proposal.command, now)?;
                            txn.put(CF_REQUESTS, id.as_bytes(), encode(&(now, &result))?)?;
                            txn.put(CF_REQUESTS_BY_TIME, &time_key(now, id), Vec::new())?;
                            result
                        }
                    }
                    Some(_) => Err(CommandError::invalid(
                        "request_id",
                        format!("at most {REQUEST_ID_MAX} bytes"),
                    )),
                    None => apply_one(&mut txn, &proposal.command, now)?,
                };
                results.push(result);
            }
        }
        txn.put(CF_META, KEY_APPLIED, meta.to_vec())?;
        let mut wo = WriteOptions::default();
        // Durability comes from the Raft log, which is synced; a lost tail of the state
        // machine is re-applied from the log. `flush_durable` syncs before log purges.
        wo.set_sync(false);
        self.db.write_opt(txn.into_batch()?, &wo)?;
        Ok(results)
    }

    fn expire_requests(&self, txn: &mut Txn<'_>, now: u64) -> Result<(), StoreError> {
        let cutoff = now.saturating_sub(REQUEST_ID_RETENTION_MS);
        let cf = self.cf(CF_REQUESTS_BY_TIME)?;
        let mut expired = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (key, _) = item?;
            if key.len() < 8 || expired.len() >= REQUEST_EXPIRY_PER_ENTRY {
                break;
            }
            let mut t = [0u8; 8];
            t.copy_from_slice(&key[..8]);
            if u64::from_be_bytes(t) >= cutoff {
                break;
            }
            expired.push(key.to_vec());
        }
        for key in expired {
            txn.delete(CF_REQUESTS, &key[8..])?;
            txn.delete(CF_REQUESTS_BY_TIME, &key)?;
        }
        Ok(())
    }

    /// Make every write so far durable (fsync the WAL). Called before the Raft log is
    /// purged behind a snapshot, so the purged entries' effects cannot be lost.
    pub fn flush_durable(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// A consistent copy of every column family, for a Raft snapshot, with the applied
    /// meta as of that same point (so the snapshot's log id matches its data exactly).
    pub fn export_snapshot(&self) -> Result<ExportedSnapshot, StoreError> {
        self.export_snapshot_when(|| {}, || true)?
            .ok_or_else(|| StoreError::Snapshot("export stopped".into()))
    }

    /// [`Store::export_snapshot`] for a caller that must know when the point in time is
    /// fixed: `taken` runs once the RocksDB snapshot exists (later writes are not in the
    /// export), and `wanted` is asked every few thousand keys; when it says no, the
    /// export stops and returns `None`.
    pub fn export_snapshot_when(
        &self,
        taken: impl FnOnce(),
        wanted: impl Fn() -> bool,
    ) -> Result<Option<ExportedSnapshot>, StoreError> {
        let snap = self.db.snapshot();
        taken();
        let meta = snap.get_cf(self.cf(CF_META)?, KEY_APPLIED)?;
        let mut entries: Vec<(u8, Vec<u8>, Vec<u8>)> = Vec::new();
        for (tag, name) in all_cfs().into_iter().enumerate() {
            let cf = self.cf(name)?;
            for item in snap.iterator_cf(cf, IteratorMode::Start) {
                let (k, v) = item?;
                entries.push((tag as u8, k.to_vec(), v.to_vec()));
                if entries.len().is_multiple_of(4096) && !wanted() {
                    return Ok(None);
                }
            }
        }
        Ok(Some((encode(&entries)?, meta)))
    }

    /// Replace the whole state with a snapshot, atomically (one write batch, synced).
    /// `meta` becomes the applied meta, overriding whatever the snapshot carried.
    pub fn install_snapshot(&self, data: &[u8], meta: &[u8]) -> Result<(), StoreError> {
        let entries: Vec<(u8, Vec<u8>, Vec<u8>)> = decode(data)?;
        let mut batch = WriteBatch::default();
        let cfs = all_cfs();
        for name in cfs.iter().copied() {
            let cf = self.cf(name)?;
            for item in self.db.iterator_cf(cf, IteratorMode::Start) {
                let (k, _) = item?;
                batch.delete_cf(cf, k);
            }
        }
        for (tag, k, v) in entries {
            let name = cfs
                .get(tag as usize)
                .ok_or_else(|| StoreError::Snapshot(format!("unknown column family tag {tag}")))?;
            batch.put_cf(self.cf(name)?, k, v);
        }
        batch.put_cf(self.cf(CF_META)?, KEY_APPLIED, meta);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Read and decode one record (for domain modules' read methods).
    pub fn get_record<T: serde::de::DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.db.get_cf(self.cf(cf)?, key)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }

    /// Every record whose key starts with `prefix`, in key order, decoded.
    pub fn scan_prefix<T: serde::de::DeserializeOwned>(
        &self,
        cf: &'static str,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let handle = self.cf(cf)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            handle,
            IteratorMode::From(prefix, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), decode(&v)?));
        }
        Ok(out)
    }

    pub fn get_site(&self, name: &str) -> Result<Option<Site>, StoreError> {
        match self.db.get_cf(self.cf(CF_SITES)?, name.as_bytes())? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }

    pub fn list_sites(&self) -> Result<Vec<Site>, StoreError> {
        let cf = self.cf(CF_SITES)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (_, v) = item?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }
}

fn time_key(time_ms: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The deterministic heart: validates against current state and stages the changes.
/// `Err(StoreError)` is a store failure (fatal for the node); a refused command is
/// `Ok(Err(CommandError))`.
/// Applies one command; a refusal leaves nothing staged.
fn apply_one(txn: &mut Txn<'_>, command: &Command, now: u64) -> Result<CommandResult, StoreError> {
    txn.begin();
    let result = apply_command(txn, command, now)?;
    if result.is_err() {
        txn.rollback();
    } else {
        txn.commit();
    }
    Ok(result)
}

fn apply_command(
    txn: &mut Txn<'_>,
    command: &Command,
    now: u64,
) -> Result<CommandResult, StoreError> {
    if let Err(e) = command.validate() {
        return Ok(Err(e));
    }
    match command {
        Command::Noop => Ok(Ok(Outcome::Done)),
        Command::CreateSite { name, description } => {
            if txn.get(CF_SITES, name.as_bytes())?.is_some() {
                return Ok(Err(CommandError::AlreadyExists {
                    kind: "site".into(),
                    id: name.clone(),
                }));
            }
            let site = Site {
                name: name.clone(),
                description: description.clone(),
                created_at_ms: now,
            };
            txn.put(CF_SITES, name.as_bytes(), encode(&site)?)?;
            Ok(Ok(Outcome::Site(site)))
        }
        Command::DeleteSite { name } => {
            if txn.get(CF_SITES, name.as_bytes())?.is_none() {
                return Ok(Err(CommandError::NotFound {
                    kind: "site".into(),
                    id: name.clone(),
                }));
            }
            if let Some(host) = crate::inventory::host_in_site(txn, name)? {
                return Ok(Err(CommandError::Conflict(format!(
                    "site '{name}' still has hosts (e.g. '{host}'); delete or move them first"
                ))));
            }
            txn.delete(CF_SITES, name.as_bytes())?;
            Ok(Ok(Outcome::Done))
        }
        Command::Identity(cmd) => Ok(crate::identity::apply(txn, cmd, now)?.map(Outcome::Identity)),
        Command::Inventory(cmd) => crate::inventory::apply(txn, cmd, now),
        Command::Jobs(cmd) => crate::jobs::apply(txn, cmd, now),
        Command::Replication(cmd) => crate::replication::apply(txn, cmd, now),
        Command::Sdrs(cmd) => crate::sdrs::apply(txn, cmd, now),
        Command::Danube(cmd) => crate::danube::apply(txn, cmd, now),
        Command::Trove(cmd) => crate::trove::apply(txn, cmd, now),
        Command::Manila(cmd) => crate::manila::apply(txn, cmd, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Proposal;

    fn batch(time_ms: u64, cmds: Vec<(Option<&str>, Command)>) -> ProposalBatch {
        ProposalBatch {
            time_ms,
            proposals: cmds
                .into_iter()
                .map(|(id, command)| Proposal {
                    request_id: id.map(str::to_string),
                    command,
                })
                .collect(),
        }
    }

    fn create(name: &str) -> Command {
        Command::CreateSite {
            name: name.into(),
            description: format!("site {name}"),
        }
    }

    #[test]
    fn create_read_your_writes_within_an_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let b = batch(
            1000,
            vec![
                (None, create("a")),
                (None, create("a")),
                (None, create("b")),
            ],
        );
        let res = store.apply_entry(Some(&b), b"m1").expect("apply");
        assert!(
            matches!(res[0], Ok(Outcome::Site(ref s)) if s.name == "a" && s.created_at_ms == 1000)
        );
        assert!(matches!(res[1], Err(CommandError::AlreadyExists { .. })));
        assert!(res[2].is_ok());
        assert_eq!(
            store.applied_meta().expect("meta").as_deref(),
            Some(&b"m1"[..])
        );
        let names: Vec<_> = store
            .list_sites()
            .expect("list")
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, vec!["a", "b"]);
    }

    #[test]
    fn retried_request_is_applied_once_and_clock_is_monotonic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let b1 = batch(5000, vec![(Some("r1"), create("a"))]);
        let first = store.apply_entry(Some(&b1), b"m1").expect("apply");
        // A leader with a clock behind the previous one: time must not go backwards.
        let b2 = batch(10, vec![(Some("r1"), create("a")), (None, create("c"))]);
        let second = store.apply_entry(Some(&b2), b"m2").expect("apply");
        assert_eq!(first[0], second[0], "a retry returns the first result");
        match &second[1] {
            Ok(Outcome::Site(s)) => assert_eq!(s.created_at_ms, 5000),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn request_ids_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .apply_entry(Some(&batch(1, vec![(Some("r1"), create("a"))])), b"m")
            .expect("apply");
        store
            .apply_entry(Some(&batch(1 + REQUEST_ID_RETENTION_MS + 1, vec![])), b"m")
            .expect("apply");
        // r1 has expired: the same id is now a new request and is refused by state.
        let res = store
            .apply_entry(
                Some(&batch(
                    REQUEST_ID_RETENTION_MS + 5,
                    vec![(Some("r1"), create("a"))],
                )),
                b"m",
            )
            .expect("apply");
        assert!(matches!(res[0], Err(CommandError::AlreadyExists { .. })));
    }

    #[test]
    fn snapshot_roundtrip_replaces_everything() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let src = Store::open(a.path()).expect("open");
        let dst = Store::open(b.path()).expect("open");
        src.apply_entry(
            Some(&batch(1, vec![(None, create("x")), (None, create("y"))])),
            b"src",
        )
        .expect("apply");
        dst.apply_entry(Some(&batch(1, vec![(None, create("stale"))])), b"dst")
            .expect("apply");
        let (data, meta) = src.export_snapshot().expect("export");
        assert_eq!(meta.as_deref(), Some(&b"src"[..]));
        dst.install_snapshot(&data, b"installed").expect("install");
        let names: Vec<_> = dst
            .list_sites()
            .expect("list")
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, vec!["x", "y"]);
        assert_eq!(
            dst.applied_meta().expect("meta").as_deref(),
            Some(&b"installed"[..])
        );
        assert!(dst.install_snapshot(b"\x01garbage", b"m").is_err());
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .apply_entry(Some(&batch(1, vec![(None, create("p"))])), b"m7")
                .expect("apply");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.get_site("p").expect("get").is_some());
        assert_eq!(
            store.applied_meta().expect("meta").as_deref(),
            Some(&b"m7"[..])
        );
    }
}
