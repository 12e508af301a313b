//! Where domain modules plug into the store.
//!
//! A domain module (sites live in `store.rs`; identity, inventory, jobs, … each get their
//! own file) owns:
//! - its column family names, listed once in [`EXTRA_CFS`] (append only: the position is
//!   the family's tag inside snapshots);
//! - its records (`serde` types, stored with `crate::codec`);
//! - a command enum wrapped by one variant of [`crate::Command`] (append new variants at the
//!   end), validated statelessly in `Command::validate` and applied through a
//!   `fn apply(txn: &mut Txn, cmd: &…, now: u64) -> Result<CommandResult, StoreError>`
//!   called from `store::apply_command`;
//! - read methods as `impl Store { … }` blocks in its own file, using
//!   [`crate::Store::get_record`] and [`crate::Store::scan_prefix`].
//!
//! `apply` must stay deterministic: read only through the `Txn`, take time only from `now`.

/// Column families of the domain modules, after the store's own.
pub const EXTRA_CFS: &[&str] = &[
    // identity.rs (crate::identity::CFS)
    crate::identity::CF_IDENTITY,
    crate::identity::CF_TOKENS,
    // inventory.rs (crate::inventory::CFS)
    crate::inventory::CF_HOSTS,
    crate::inventory::CF_HOSTS_BY_SITE,
    crate::inventory::CF_SERVERS,
    crate::inventory::CF_SHARES,
    crate::inventory::CF_DATABASES,
    crate::inventory::CF_WORKLOADS_BY_HOST,
    crate::inventory::CF_WORKLOADS_BY_PROJECT,
    crate::inventory::CF_RESERVATIONS_BY_HOLDER,
    // jobs.rs (crate::jobs::CFS)
    crate::jobs::CF_JOBS,
    crate::jobs::CF_TASKS,
    crate::jobs::CF_JOBS_BY_TIME,
    crate::jobs::CF_JOBS_BY_PROJECT,
    crate::jobs::CF_JOBS_FINISHED,
    crate::jobs::CF_TASKS_READY,
    crate::jobs::CF_TASK_LEASES,
    crate::jobs::CF_TASKS_BY_HOST,
    // replication.rs (crate::replication::CFS)
    crate::replication::CF_PAIRS,
    crate::replication::CF_PAIRS_DUE,
    crate::replication::CF_PAIRS_BY_OWNER,
    crate::replication::CF_PAIRS_BY_JOB,
    // the families' own records (sdrs.rs, danube.rs, trove.rs, manila.rs)
    crate::sdrs::CF_SDRS,
    crate::sdrs::CF_SDRS_INDEX,
    crate::danube::CF_DANUBE,
    crate::danube::CF_DANUBE_INDEX,
    crate::trove::CF_TROVE,
    crate::trove::CF_TROVE_INDEX,
    crate::manila::CF_MANILA,
    crate::manila::CF_MANILA_INDEX,
];

/// Every module that reacts to the end of a job, called by `crate::jobs` in the same
/// transaction: pairs first (their state is what the families read), then the families.
pub(crate) fn on_job_end(
    txn: &mut crate::txn::Txn<'_>,
    job: &crate::jobs::Job,
    now: u64,
) -> Result<(), crate::error::StoreError> {
    crate::replication::on_job_end(txn, job, now)?;
    crate::sdrs::on_job_end(txn, job, now)?;
    crate::danube::on_job_end(txn, job, now)?;
    crate::trove::on_job_end(txn, job, now)?;
    crate::manila::on_job_end(txn, job, now)
}
