//! The pending writes of one log entry, with read-your-writes, for `apply`.
//!
//! Every read inside `apply` goes through a `Txn`, so a command sees the effects of the
//! commands before it in the same entry. Reads never see anything but the store and the
//! overlay: `apply` stays deterministic.

use std::collections::{BTreeMap, HashMap};

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use crate::error::StoreError;

/// The pending writes of one entry, with read-your-writes for point lookups.
pub struct Txn<'a> {
    db: &'a DB,
    batch: WriteBatch,
    overlay: HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(db: &'a DB) -> Self {
        Txn {
            db,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
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
        self.batch.put_cf(self.cf(cf)?, key, &value);
        self.overlay.insert((cf, key.to_vec()), Some(value));
        Ok(())
    }

    pub fn delete(&mut self, cf: &'static str, key: &[u8]) -> Result<(), StoreError> {
        self.batch.delete_cf(self.cf(cf)?, key);
        self.overlay.insert((cf, key.to_vec()), None);
        Ok(())
    }
}

impl<'a> Txn<'a> {
    pub(crate) fn into_batch(self) -> WriteBatch {
        self.batch
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
    pub fn scan_prefix(
        &self,
        cf: &'static str,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
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
        for ((c, k), v) in &self.overlay {
            if *c == cf && k.starts_with(prefix) {
                merged.insert(k.clone(), v.clone());
            }
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
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
        store.db.write(txn.into_batch()).expect("write");

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
}
