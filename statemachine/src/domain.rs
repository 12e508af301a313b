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
pub const EXTRA_CFS: &[&str] = &[];
