//! The pending writes of one log entry, with read-your-writes, for `apply`.
//!
//! Every read inside `apply` goes through a `Txn`, so a command sees the effects of the
//! commands before it in the same entry. Reads never see anything but the store and the
//! overlay: `apply` stays deterministic.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use crate::error::StoreError;

/// One raw (key, value) pair.
pub type KeyValue = (Vec<u8>, Vec<u8>);
/// Raw (key, value) pairs in key order.
pub type KeyValues = Vec<KeyValue>;

type OverlayKey = (&'static str, Vec<u8>);
/// A staged key with its overlay value before (None: it was not staged).
type Undo = (OverlayKey, Option<Option<Vec<u8>>>);

/// The pending writes of one entry, with read-your-writes for point lookups.
///
/// A refused command leaves no trace: `store` opens a command with [`Txn::begin`] and,
/// when the command answers with an error, undoes whatever it staged with
/// [`Txn::rollback`]. So a command may stage writes before it finds a reason to refuse.
pub struct Txn<'a> {
    db: &'a DB,
    /// Ordered, so prefix scans of the staged writes are range reads.
    overlay: BTreeMap<OverlayKey, Option<Vec<u8>>>,
    /// Since `begin`: each staged key with its overlay value before (None: not staged).
    undo: Option<Vec<Undo>>,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(db: &'a DB) -> Self {
        Txn {
            db,
            overlay: BTreeMap::new(),
            undo: None,
        }
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&'a rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))
    }

    pub fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(&(cf, key.to_vec())) {
            return Ok(v.clone());
        }
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    pub fn put(&mut self, cf: &'static str, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.stage((cf, key.to_vec()), Some(value))
    }

    pub fn delete(&mut self, cf: &'static str, key: &[u8]) -> Result<(), StoreError> {
        self.stage((cf, key.to_vec()), None)
    }

    fn stage(&mut self, key: OverlayKey, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.cf(key.0)?;
        let prev = self.overlay.insert(key.clone(), value);
        if let Some(undo) = &mut self.undo {
            undo.push((key, prev));
        }
        Ok(())
    }

    /// Starts recording what the next command stages.
    pub(crate) fn begin(&mut self) {
        self.undo = Some(Vec::new());
    }

    /// Keeps what the command since [`Txn::begin`] staged.
    pub(crate) fn commit(&mut self) {
        self.undo = None;
    }

    /// Undoes what the command since [`Txn::begin`] staged.
    pub(crate) fn rollback(&mut self) {
        if let Some(undo) = self.undo.take() {
            for (key, prev) in undo.into_iter().rev() {
                match prev {
                    Some(v) => {
                        self.overlay.insert(key, v);
                    }
                    None => {
                        self.overlay.remove(&key);
                    }
                }
            }
        }
    }
}

impl<'a> Txn<'a> {
    /// The staged writes as one batch (each key's last value; order between keys does
    /// not matter).
    /// The staged writes of `cf` whose key starts with `prefix`, in key order.
    fn staged_with_prefix<'s>(
        &'s self,
        cf: &'static str,
        prefix: &'s [u8],
    ) -> impl Iterator<Item = (&'s OverlayKey, &'s Option<Vec<u8>>)> + 's {
        self.overlay
            .range((cf, prefix.to_vec())..)
            .take_while(move |((c, k), _)| *c == cf && k.starts_with(prefix))
    }

    pub(crate) fn into_batch(self) -> Result<WriteBatch, StoreError> {
        let mut batch = WriteBatch::default();
        for ((cf, key), value) in self.overlay {
            let handle = self
                .db
                .cf_handle(cf)
                .ok_or(StoreError::MissingColumnFamily(cf))?;
            match value {
                Some(v) => batch.put_cf(handle, &key, &v),
                None => batch.delete_cf(handle, &key),
            }
        }
        Ok(batch)
    }

    /// The store under the overlay, for ordered scans that stop early (e.g. expiry indexes);
    /// such reads do not see this entry's staged writes.
    pub(crate) fn db(&self) -> &'a DB {
        self.db
    }

    /// Read and decode a record.
    pub fn get_record<T: DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.get(cf, key)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }

    /// Encode and stage a record.
    pub fn put_record<T: Serialize>(
        &mut self,
        cf: &'static str,
        key: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = encode(value)?;
        self.put(cf, key, bytes)
    }

    /// Every (key, value) whose key starts with `prefix`, in key order, as this entry sees
    /// them (store merged with the overlay).
    pub fn scan_prefix(&self, cf: &'static str, prefix: &[u8]) -> Result<KeyValues, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let handle = self.cf(cf)?;
        for item in self
            .db
            .iterator_cf(handle, IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        for ((_, k), v) in self.staged_with_prefix(cf, prefix) {
            merged.insert(k.clone(), v.clone());
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    /// The first `limit` (key, value) pairs whose key starts with `prefix`, in key order,
    /// as this entry sees them. Unlike [`Txn::scan_prefix`] it reads only as far into the
    /// store as it needs (plus keys this entry deleted), for bounded work per entry
    /// (expiry and purge scans over time-ordered indexes).
    pub fn scan_prefix_limit(
        &self,
        cf: &'static str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<KeyValues, StoreError> {
        let mut staged: BTreeMap<&[u8], &Option<Vec<u8>>> = BTreeMap::new();
        for ((_, k), v) in self.staged_with_prefix(cf, prefix) {
            staged.insert(k.as_slice(), v);
        }
        let mut staged = staged.into_iter().peekable();
        let mut out = Vec::new();
        let handle = self.cf(cf)?;
        let mut stored = self
            .db
            .iterator_cf(handle, IteratorMode::From(prefix, Direction::Forward));
        let mut next_stored = || -> Result<Option<KeyValue>, StoreError> {
            match stored.next() {
                Some(item) => {
                    let (k, v) = item?;
                    Ok(k.starts_with(prefix).then(|| (k.to_vec(), v.to_vec())))
                }
                None => Ok(None),
            }
        };
        let mut cur = next_stored()?;
        while out.len() < limit {
            let take_staged = match (&cur, staged.peek()) {
                (None, None) => break,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some((sk, _)), Some((ok, _))) => ok <= &sk.as_slice(),
            };
            if take_staged {
                let Some((k, v)) = staged.next() else { break };
                if cur.as_ref().is_some_and(|(sk, _)| sk.as_slice() == k) {
                    cur = next_stored()?;
                }
                if let Some(v) = v {
                    out.push((k.to_vec(), v.clone()));
                }
            } else if let Some(kv) = cur.take() {
                out.push(kv);
                cur = next_stored()?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, CF_SITES};

    #[test]
    fn scan_prefix_merges_staged_writes_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut txn = super::Txn::new(&store.db);
        txn.put(CF_SITES, b"p/1", b"one".to_vec()).expect("put");
        txn.put(CF_SITES, b"p/2", b"two".to_vec()).expect("put");
        txn.put(CF_SITES, b"q/1", b"other".to_vec()).expect("put");
        store
            .db
            .write(txn.into_batch().expect("batch"))
            .expect("write");

        let mut txn = super::Txn::new(&store.db);
        txn.delete(CF_SITES, b"p/1").expect("delete");
        txn.put(CF_SITES, b"p/3", b"three".to_vec()).expect("put");
        let keys: Vec<Vec<u8>> = txn
            .scan_prefix(CF_SITES, b"p/")
            .expect("scan")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![b"p/2".to_vec(), b"p/3".to_vec()]);
    }

    #[test]
    fn scan_prefix_limit_merges_and_stops_early() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut txn = super::Txn::new(&store.db);
        for k in [&b"p/1"[..], b"p/3", b"p/5", b"q/1"] {
            txn.put(CF_SITES, k, k.to_vec()).expect("put");
        }
        store
            .db
            .write(txn.into_batch().expect("batch"))
            .expect("write");

        let mut txn = super::Txn::new(&store.db);
        txn.delete(CF_SITES, b"p/1").expect("delete");
        txn.put(CF_SITES, b"p/2", b"two".to_vec()).expect("put");
        txn.put(CF_SITES, b"p/3", b"three".to_vec()).expect("put");
        let got = txn.scan_prefix_limit(CF_SITES, b"p/", 10).expect("scan");
        assert_eq!(got, txn.scan_prefix(CF_SITES, b"p/").expect("full scan"));
        let keys: Vec<Vec<u8>> = got.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(
            keys,
            vec![b"p/2".to_vec(), b"p/3".to_vec(), b"p/5".to_vec()]
        );
        assert_eq!(got[1].1, b"three".to_vec());
        let two = txn.scan_prefix_limit(CF_SITES, b"p/", 2).expect("scan");
        assert_eq!(two.len(), 2);
        assert_eq!(two[1].0, b"p/3".to_vec());
        assert!(txn
            .scan_prefix_limit(CF_SITES, b"p/", 0)
            .expect("scan")
            .is_empty());
    }
}
