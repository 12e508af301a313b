//! openraft's own storage test suite, run against drplane's RocksDB log store and state
//! machine adapter (real RocksDB in a temporary directory, one per test case).

#![allow(clippy::result_large_err)]

use std::sync::Arc;

use drplane_raft::log_store::LogStore;
use drplane_raft::metrics::Metrics;
use drplane_raft::state_machine::StateMachine;
use drplane_raft::{StorageError, TypeConfig};
use drplane_statemachine::Store;
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageIOError;
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir =
            tempfile::tempdir().map_err(|e| StorageIOError::write(openraft::AnyError::new(&e)))?;
        let log = LogStore::open(&dir.path().join("log"), Arc::new(Metrics::default()))?;
        let store = Store::open(&dir.path().join("state"))
            .map_err(|e| StorageIOError::write(openraft::AnyError::new(&e)))?;
        let sm = StateMachine::new(store)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)
}
