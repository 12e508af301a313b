//! Inventory: the hosts (one per agent) and the workloads on them — servers, file shares
//! and database instances — as agents report them or operators register them by hand.
//!
//! Column families (see [`CFS`]):
//! - `hosts`: host name -> [`Host`];
//! - `hosts_by_site`: `site \0 host` -> () (a site with hosts cannot be deleted);
//! - `servers`, `shares`, `databases`: id -> [`Server`] / [`Share`] / [`DatabaseInstance`];
//! - `workloads_by_host`: `host \0 kind-tag id` -> ();
//! - `workloads_by_project`: `project \0 kind-tag id` -> ();
//! - `reservations_by_holder`: `holder \0 host` -> () (a job's reservations are released
//!   when the job ends).
//!
//! Rules (deterministic; every node refuses the same command with the same error):
//! - A host's site must exist: registering a host in an unknown site is refused with
//!   `NotFound { kind: "site" }`, never auto-created (a typo must not create a failure
//!   domain that the site-majority rule would then count).
//! - Registration is an idempotent upsert: capacity, driver, address and site are replaced;
//!   reservations, the allocation of its workloads and `registered_at_ms` are kept.
//! - A workload's host must exist, and every storage pool it names must be one of that
//!   host's pools. Registering a workload is an upsert by id (its host may change: that is
//!   how a finished migration is recorded).
//! - `allocated` on a host is the sum of the flavors of the servers and database instances
//!   registered on it, maintained by apply. A reservation is admitted when
//!   `allocated + reserved + requested <= capacity` for vCPUs and RAM, and
//!   `reserved + requested <= free_bytes` for each pool (free bytes as the agent last
//!   reported them). Otherwise: `Conflict("insufficient <what> on host '<h>': …")`.
//! - A host with workloads, assigned tasks or reservations cannot be deleted.
//!
//! Records carry `created_at_ms`/`updated_at_ms` set by apply from the entry's time; the
//! values in a command are ignored.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{CommandResult, Outcome};
use crate::error::{CommandError, StoreError};
use crate::store::{Store, CF_SITES};
use crate::txn::Txn;

pub const CF_HOSTS: &str = "hosts";
pub const CF_HOSTS_BY_SITE: &str = "hosts_by_site";
pub const CF_SERVERS: &str = "servers";
pub const CF_SHARES: &str = "shares";
pub const CF_DATABASES: &str = "databases";
pub const CF_WORKLOADS_BY_HOST: &str = "workloads_by_host";
pub const CF_WORKLOADS_BY_PROJECT: &str = "workloads_by_project";
pub const CF_RESERVATIONS_BY_HOLDER: &str = "reservations_by_holder";

/// This module's column families, in the order they are listed in `EXTRA_CFS`.
pub const CFS: &[&str] = &[
    CF_HOSTS,
    CF_HOSTS_BY_SITE,
    CF_SERVERS,
    CF_SHARES,
    CF_DATABASES,
    CF_WORKLOADS_BY_HOST,
    CF_WORKLOADS_BY_PROJECT,
    CF_RESERVATIONS_BY_HOLDER,
];

/// Longest host or storage pool name.
pub const HOST_NAME_MAX: usize = 128;
/// Longest id (workload, disk, job, task, reservation holder).
pub const ID_MAX: usize = 128;
/// Longest project id.
pub const PROJECT_MAX: usize = 64;
/// Longest display name of a workload.
pub const DISPLAY_NAME_MAX: usize = 255;
/// Longest path or agent address.
pub const PATH_MAX: usize = 4096;
/// Most storage pools per host, disks per server, workloads per registration command.
pub const POOLS_MAX: usize = 64;
pub const DISKS_MAX: usize = 64;
pub const WORKLOADS_PER_COMMAND_MAX: usize = 1024;

// ---------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------

/// Whether the host's agent is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    Online,
    Offline,
}

/// How the host's agent moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// Real files on a real filesystem.
    Fs,
    /// Simulated host (latencies, injected failures), for tests and scale benchmarks.
    Sim,
    /// Registered by hand, no agent yet.
    None,
}

/// One storage pool of a host, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoragePool {
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// What a host has.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub ram_mb: u64,
    pub pools: Vec<StoragePool>,
}

/// A quantity of resources: requested, reserved or available.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResourceAmount {
    pub vcpus: u32,
    pub ram_mb: u64,
    /// Bytes per storage pool name.
    pub pool_bytes: BTreeMap<String, u64>,
}

/// Resources set aside on a host for a holder (a job, a task, a replication pair, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub resources: ResourceAmount,
    pub created_at_ms: u64,
}

/// vCPUs and RAM used by the workloads registered on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Allocation {
    pub vcpus: u64,
    pub ram_mb: u64,
}

/// A compute or storage host, run by one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub site: String,
    pub state: HostState,
    pub driver: Driver,
    /// Where the agent listens (`host:port`), empty when unknown.
    pub agent_address: String,
    pub capacity: Capacity,
    /// Sum of the flavors of the servers and database instances on this host.
    pub allocated: Allocation,
    /// Reservations by holder id.
    pub reservations: BTreeMap<String, Reservation>,
    pub last_heartbeat_ms: Option<u64>,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Host {
    /// The sum of all reservations.
    pub fn reserved(&self) -> ResourceAmount {
        let mut total = ResourceAmount::default();
        for r in self.reservations.values() {
            total.vcpus = total.vcpus.saturating_add(r.resources.vcpus);
            total.ram_mb = total.ram_mb.saturating_add(r.resources.ram_mb);
            for (pool, bytes) in &r.resources.pool_bytes {
                let e = total.pool_bytes.entry(pool.clone()).or_insert(0);
                *e = e.saturating_add(*bytes);
            }
        }
        total
    }

    /// What can still be reserved: capacity minus allocation minus reservations (vCPUs,
    /// RAM), free bytes minus reservations (pools). Never negative.
    pub fn available(&self) -> ResourceAmount {
        self.available_excluding(None)
    }

    /// [`Host::available`] as if `holder`'s reservation did not exist (for replacing it).
    pub fn available_excluding(&self, holder: Option<&str>) -> ResourceAmount {
        let mut reserved = ResourceAmount::default();
        for (h, r) in &self.reservations {
            if Some(h.as_str()) == holder {
                continue;
            }
            reserved.vcpus = reserved.vcpus.saturating_add(r.resources.vcpus);
            reserved.ram_mb = reserved.ram_mb.saturating_add(r.resources.ram_mb);
            for (pool, bytes) in &r.resources.pool_bytes {
                let e = reserved.pool_bytes.entry(pool.clone()).or_insert(0);
                *e = e.saturating_add(*bytes);
            }
        }
        let vcpus = u64::from(self.capacity.vcpus)
            .saturating_sub(self.allocated.vcpus)
            .saturating_sub(u64::from(reserved.vcpus));
        ResourceAmount {
            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
            ram_mb: self
                .capacity
                .ram_mb
                .saturating_sub(self.allocated.ram_mb)
                .saturating_sub(reserved.ram_mb),
            pool_bytes: self
                .capacity
                .pools
                .iter()
                .map(|p| {
                    let r = reserved.pool_bytes.get(&p.name).copied().unwrap_or(0);
                    (p.name.clone(), p.free_bytes.saturating_sub(r))
                })
                .collect(),
        }
    }

    pub fn pool(&self, name: &str) -> Option<&StoragePool> {
        self.capacity.pools.iter().find(|p| p.name == name)
    }

    pub fn is_online(&self) -> bool {
        self.state == HostState::Online
    }
}

/// What an agent (or an operator) registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRegistration {
    pub name: String,
    pub site: String,
    pub driver: Driver,
    pub agent_address: String,
    pub capacity: Capacity,
    /// `Some(Online)`: the host is online and heartbeats now (an agent's registration).
    /// `Some(Offline)`: set offline. `None`: keep the current state (new hosts: offline).
    pub state: Option<HostState>,
}

/// vCPUs and RAM of a server or database instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Flavor {
    pub vcpus: u32,
    pub ram_mb: u64,
}

/// Server states (Nova/ECS names). New states go at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerStatus {
    Build,
    Active,
    Shutoff,
    Migrating,
    Reboot,
    Error,
}

/// One disk of a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: String,
    pub size_bytes: u64,
    pub pool: String,
    /// Where the driver keeps it (fs: an image file under the agent's data directory).
    pub path: String,
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub id: String,
    pub project: String,
    pub name: String,
    pub host: String,
    pub status: ServerStatus,
    pub flavor: Flavor,
    pub disks: Vec<Disk>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Share states (Manila names). New states go at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareStatus {
    Creating,
    Available,
    Migrating,
    Deleting,
    Error,
}

/// A file share: a directory tree on one pool of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub id: String,
    pub project: String,
    pub name: String,
    pub host: String,
    pub pool: String,
    pub size_bytes: u64,
    pub path: String,
    pub status: ShareStatus,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Database instance states (Trove names). New states go at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DatabaseStatus {
    Build,
    Active,
    Shutdown,
    Reboot,
    Error,
}

/// The data volume of a database instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub size_bytes: u64,
    pub pool: String,
    pub path: String,
}

/// Datastore type and version, e.g. `mysql` `8.0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    #[serde(rename = "type")]
    pub kind: String,
    pub version: String,
}

/// A database instance (Trove's "instance").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseInstance {
    pub id: String,
    pub project: String,
    pub name: String,
    pub host: String,
    pub status: DatabaseStatus,
    pub volume: Volume,
    pub flavor: Flavor,
    pub datastore: Datastore,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Which kind of workload an id names (ids are unique per kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Server,
    Share,
    Database,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Server => "server",
            WorkloadKind::Share => "share",
            WorkloadKind::Database => "database",
        }
    }

    fn tag(self) -> u8 {
        match self {
            WorkloadKind::Server => b's',
            WorkloadKind::Share => b'h',
            WorkloadKind::Database => b'd',
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            b's' => Some(WorkloadKind::Server),
            b'h' => Some(WorkloadKind::Share),
            b'd' => Some(WorkloadKind::Database),
            _ => None,
        }
    }

    fn cf(self) -> &'static str {
        match self {
            WorkloadKind::Server => CF_SERVERS,
            WorkloadKind::Share => CF_SHARES,
            WorkloadKind::Database => CF_DATABASES,
        }
    }
}

/// Any workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workload {
    Server(Server),
    Share(Share),
    Database(DatabaseInstance),
}

impl Workload {
    pub fn kind(&self) -> WorkloadKind {
        match self {
            Workload::Server(_) => WorkloadKind::Server,
            Workload::Share(_) => WorkloadKind::Share,
            Workload::Database(_) => WorkloadKind::Database,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Workload::Server(s) => &s.id,
            Workload::Share(s) => &s.id,
            Workload::Database(d) => &d.id,
        }
    }

    pub fn project(&self) -> &str {
        match self {
            Workload::Server(s) => &s.project,
            Workload::Share(s) => &s.project,
            Workload::Database(d) => &d.project,
        }
    }

    pub fn host(&self) -> &str {
        match self {
            Workload::Server(s) => &s.host,
            Workload::Share(s) => &s.host,
            Workload::Database(d) => &d.host,
        }
    }

    /// vCPUs and RAM it takes on its host.
    pub fn allocation(&self) -> Allocation {
        match self {
            Workload::Server(s) => Allocation {
                vcpus: u64::from(s.flavor.vcpus),
                ram_mb: s.flavor.ram_mb,
            },
            Workload::Share(_) => Allocation::default(),
            Workload::Database(d) => Allocation {
                vcpus: u64::from(d.flavor.vcpus),
                ram_mb: d.flavor.ram_mb,
            },
        }
    }

    /// Storage pools it names.
    pub fn pools(&self) -> Vec<&str> {
        match self {
            Workload::Server(s) => s.disks.iter().map(|d| d.pool.as_str()).collect(),
            Workload::Share(s) => vec![s.pool.as_str()],
            Workload::Database(d) => vec![d.volume.pool.as_str()],
        }
    }

    fn set_times(&mut self, created_at_ms: u64, updated_at_ms: u64) {
        let (c, u) = match self {
            Workload::Server(s) => (&mut s.created_at_ms, &mut s.updated_at_ms),
            Workload::Share(s) => (&mut s.created_at_ms, &mut s.updated_at_ms),
            Workload::Database(d) => (&mut d.created_at_ms, &mut d.updated_at_ms),
        };
        *c = created_at_ms;
        *u = updated_at_ms;
    }

    fn created_at_ms(&self) -> u64 {
        match self {
            Workload::Server(s) => s.created_at_ms,
            Workload::Share(s) => s.created_at_ms,
            Workload::Database(d) => d.created_at_ms,
        }
    }

    fn validate(&self) -> Result<(), CommandError> {
        validate_id("id", self.id())?;
        validate_project(self.project())?;
        validate_host_name("host", self.host())?;
        match self {
            Workload::Server(s) => {
                validate_display_name("name", &s.name)?;
                if s.disks.len() > DISKS_MAX {
                    return Err(CommandError::invalid(
                        "disks",
                        format!("at most {DISKS_MAX} disks per server"),
                    ));
                }
                let mut ids = BTreeSet::new();
                for d in &s.disks {
                    validate_id("disks.id", &d.id)?;
                    if !ids.insert(d.id.as_str()) {
                        return Err(CommandError::invalid(
                            "disks.id",
                            format!("disk id '{}' appears twice", d.id),
                        ));
                    }
                    validate_host_name("disks.pool", &d.pool)?;
                    validate_path("disks.path", &d.path)?;
                }
            }
            Workload::Share(s) => {
                validate_display_name("name", &s.name)?;
                validate_host_name("pool", &s.pool)?;
                validate_path("path", &s.path)?;
            }
            Workload::Database(d) => {
                validate_display_name("name", &d.name)?;
                validate_id("volume.id", &d.volume.id)?;
                validate_host_name("volume.pool", &d.volume.pool)?;
                validate_path("volume.path", &d.volume.path)?;
                validate_id("datastore.type", &d.datastore.kind)?;
                if d.datastore.version.len() > 64 {
                    return Err(CommandError::invalid(
                        "datastore.version",
                        "at most 64 bytes",
                    ));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

/// Inventory changes. Add new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryCommand {
    /// Create or replace a host (an agent's registration, or by hand). -> `Outcome::Host`.
    RegisterHost(Box<HostRegistration>),
    /// The agent is alive: online, `last_heartbeat_ms = now`; `pools` (if given) replaces
    /// the reported pools (free bytes change as data moves). -> `Outcome::Host`.
    Heartbeat {
        name: String,
        pools: Option<Vec<StoragePool>>,
    },
    /// Mark a host offline. With `if_no_heartbeat_since_ms`, refused (`Conflict`) when
    /// the host heartbeated at or after that time: a heartbeat that raced the scheduler's
    /// decision wins. -> `Outcome::Host`.
    MarkHostOffline {
        name: String,
        if_no_heartbeat_since_ms: Option<u64>,
    },
    /// Remove a host without workloads, assigned tasks or reservations. -> `Outcome::Done`.
    DeleteHost { name: String },
    /// Create or replace workloads, all or none. -> `Outcome::Workloads`.
    RegisterWorkloads { workloads: Vec<Workload> },
    /// Remove a workload. -> `Outcome::Done`.
    DeleteWorkload { kind: WorkloadKind, id: String },
    /// Set resources aside on a host for `holder`, replacing the holder's previous
    /// reservation on that host; refused with `Conflict("insufficient …")` when short.
    /// -> `Outcome::Host`.
    Reserve {
        host: String,
        holder: String,
        resources: ResourceAmount,
    },
    /// Drop `holder`'s reservation on a host (idempotent). -> `Outcome::Host`.
    Release { host: String, holder: String },
    /// What an agent reports when it connects: workloads not yet known are created; a
    /// known one keeps its record, because the control plane owns it from then on (its
    /// status after a stop or a failover, its host after a migration): an agent restarting
    /// with its old configuration must not undo them. -> `Outcome::Workloads` (the ones
    /// created).
    ReportWorkloads { workloads: Vec<Workload> },
}

impl InventoryCommand {
    pub fn validate(&self) -> Result<(), CommandError> {
        match self {
            InventoryCommand::RegisterHost(reg) => {
                validate_host_name("name", &reg.name)?;
                crate::command::validate_site_name(&reg.site)
                    .map_err(|e| rename_field(e, "site"))?;
                validate_path("agent_address", &reg.agent_address)?;
                validate_pools(&reg.capacity.pools)
            }
            InventoryCommand::Heartbeat { name, pools } => {
                validate_host_name("name", name)?;
                match pools {
                    Some(p) => validate_pools(p),
                    None => Ok(()),
                }
            }
            InventoryCommand::MarkHostOffline { name, .. }
            | InventoryCommand::DeleteHost { name } => validate_host_name("name", name),
            InventoryCommand::RegisterWorkloads { workloads }
            | InventoryCommand::ReportWorkloads { workloads } => {
                if workloads.is_empty() || workloads.len() > WORKLOADS_PER_COMMAND_MAX {
                    return Err(CommandError::invalid(
                        "workloads",
                        format!("give 1 to {WORKLOADS_PER_COMMAND_MAX} workloads"),
                    ));
                }
                let mut seen = BTreeSet::new();
                for w in workloads {
                    w.validate()?;
                    if !seen.insert((w.kind(), w.id())) {
                        return Err(CommandError::invalid(
                            "workloads",
                            format!("{} '{}' appears twice", w.kind().as_str(), w.id()),
                        ));
                    }
                }
                Ok(())
            }
            InventoryCommand::DeleteWorkload { id, .. } => validate_id("id", id),
            InventoryCommand::Reserve {
                host,
                holder,
                resources,
            } => {
                validate_host_name("host", host)?;
                validate_id("holder", holder)?;
                if resources.pool_bytes.len() > POOLS_MAX {
                    return Err(CommandError::invalid(
                        "resources.pool_bytes",
                        format!("at most {POOLS_MAX} pools"),
                    ));
                }
                for pool in resources.pool_bytes.keys() {
                    validate_host_name("resources.pool_bytes", pool)?;
                }
                Ok(())
            }
            InventoryCommand::Release { host, holder } => {
                validate_host_name("host", host)?;
                validate_id("holder", holder)
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            InventoryCommand::RegisterHost(_) => "register_host",
            InventoryCommand::Heartbeat { .. } => "host_heartbeat",
            InventoryCommand::MarkHostOffline { .. } => "mark_host_offline",
            InventoryCommand::DeleteHost { .. } => "delete_host",
            InventoryCommand::RegisterWorkloads { .. } => "register_workloads",
            InventoryCommand::ReportWorkloads { .. } => "report_workloads",
            InventoryCommand::DeleteWorkload { .. } => "delete_workload",
            InventoryCommand::Reserve { .. } => "reserve_resources",
            InventoryCommand::Release { .. } => "release_resources",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validation helpers (shared with `jobs`)
// ---------------------------------------------------------------------------------------

fn rename_field(e: CommandError, field: &str) -> CommandError {
    match e {
        CommandError::Invalid { reason, .. } => CommandError::invalid(field, reason),
        other => other,
    }
}

fn name_like(s: &str, extra: &str) -> bool {
    let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let last_ok = s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok
        && last_ok
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

/// Host and storage pool names: 1 to 128 ASCII letters, digits, `.`, `_`, `-`, starting
/// and ending with a letter or digit.
pub fn validate_host_name(field: &str, name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > HOST_NAME_MAX {
        return Err(CommandError::invalid(
            field,
            format!("must be 1 to {HOST_NAME_MAX} characters"),
        ));
    }
    if !name_like(name, "._-") {
        return Err(CommandError::invalid(
            field,
            "use letters, digits, '.', '_' and '-', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// Ids (workloads, disks, jobs, tasks, holders): 1 to 128 ASCII letters, digits, `.`,
/// `_`, `-`, `:`, starting and ending with a letter or digit. UUIDs qualify.
pub fn validate_id(field: &str, id: &str) -> Result<(), CommandError> {
    if id.is_empty() || id.len() > ID_MAX {
        return Err(CommandError::invalid(
            field,
            format!("must be 1 to {ID_MAX} characters"),
        ));
    }
    if !name_like(id, "._-:") {
        return Err(CommandError::invalid(
            field,
            "use letters, digits, '.', '_', '-' and ':', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// Project ids: 1 to 64 ASCII letters, digits, `_`, `-` (Keystone ids are 32 hex digits).
pub fn validate_project(project: &str) -> Result<(), CommandError> {
    if project.is_empty()
        || project.len() > PROJECT_MAX
        || !project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(CommandError::invalid(
            "project",
            format!("must be 1 to {PROJECT_MAX} letters, digits, '_' or '-'"),
        ));
    }
    Ok(())
}

fn validate_display_name(field: &str, name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > DISPLAY_NAME_MAX || name.chars().any(char::is_control) {
        return Err(CommandError::invalid(
            field,
            format!("must be 1 to {DISPLAY_NAME_MAX} bytes without control characters"),
        ));
    }
    Ok(())
}

fn validate_path(field: &str, path: &str) -> Result<(), CommandError> {
    if path.len() > PATH_MAX || path.chars().any(char::is_control) {
        return Err(CommandError::invalid(
            field,
            format!("must be at most {PATH_MAX} bytes without control characters"),
        ));
    }
    Ok(())
}

fn validate_pools(pools: &[StoragePool]) -> Result<(), CommandError> {
    if pools.len() > POOLS_MAX {
        return Err(CommandError::invalid(
            "capacity.pools",
            format!("at most {POOLS_MAX} storage pools"),
        ));
    }
    let mut seen = BTreeSet::new();
    for p in pools {
        validate_host_name("capacity.pools.name", &p.name)?;
        if !seen.insert(p.name.as_str()) {
            return Err(CommandError::invalid(
                "capacity.pools.name",
                format!("pool '{}' appears twice", p.name),
            ));
        }
        if p.free_bytes > p.total_bytes {
            return Err(CommandError::invalid(
                "capacity.pools.free_bytes",
                format!(
                    "pool '{}' has free_bytes {} above total_bytes {}",
                    p.name, p.free_bytes, p.total_bytes
                ),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

fn pair_key(a: &str, b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b);
    k
}

fn prefix_of(a: &str) -> Vec<u8> {
    pair_key(a, b"")
}

fn workload_index_key(owner: &str, kind: WorkloadKind, id: &str) -> Vec<u8> {
    let mut tail = Vec::with_capacity(1 + id.len());
    tail.push(kind.tag());
    tail.extend_from_slice(id.as_bytes());
    pair_key(owner, &tail)
}

fn not_found(kind: &str, id: &str) -> CommandError {
    CommandError::NotFound {
        kind: kind.into(),
        id: id.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------

/// Applies one inventory command. Every check happens before the first staged write, so
/// a refused command leaves nothing behind.
pub(crate) fn apply(
    txn: &mut Txn<'_>,
    cmd: &InventoryCommand,
    now: u64,
) -> Result<CommandResult, StoreError> {
    match cmd {
        InventoryCommand::RegisterHost(reg) => register_host(txn, reg, now),
        InventoryCommand::Heartbeat { name, pools } => {
            let Some(mut host) = txn.get_record::<Host>(CF_HOSTS, name.as_bytes())? else {
                return Ok(Err(not_found("host", name)));
            };
            host.state = HostState::Online;
            host.last_heartbeat_ms = Some(now);
            if let Some(pools) = pools {
                host.capacity.pools = pools.clone();
            }
            host.updated_at_ms = now;
            txn.put_record(CF_HOSTS, name.as_bytes(), &host)?;
            Ok(Ok(Outcome::Host(Box::new(host))))
        }
        InventoryCommand::MarkHostOffline {
            name,
            if_no_heartbeat_since_ms,
        } => {
            let Some(mut host) = txn.get_record::<Host>(CF_HOSTS, name.as_bytes())? else {
                return Ok(Err(not_found("host", name)));
            };
            if let (Some(since), Some(last)) = (if_no_heartbeat_since_ms, host.last_heartbeat_ms) {
                if last >= *since {
                    return Ok(Err(CommandError::Conflict(format!(
                        "host '{name}' heartbeated at {last} ms, not before {since} ms: it stays {}",
                        if host.is_online() { "online" } else { "offline" }
                    ))));
                }
            }
            if host.state != HostState::Offline {
                host.state = HostState::Offline;
                host.updated_at_ms = now;
                txn.put_record(CF_HOSTS, name.as_bytes(), &host)?;
            }
            Ok(Ok(Outcome::Host(Box::new(host))))
        }
        InventoryCommand::DeleteHost { name } => delete_host(txn, name),
        InventoryCommand::RegisterWorkloads { workloads } => {
            register_workloads(txn, workloads, now)
        }
        InventoryCommand::ReportWorkloads { workloads } => {
            let mut new = Vec::new();
            for w in workloads {
                if load_workload(txn, w.kind(), w.id())?.is_none() {
                    new.push(w.clone());
                }
            }
            if new.is_empty() {
                return Ok(Ok(Outcome::Workloads(Vec::new())));
            }
            register_workloads(txn, &new, now)
        }
        InventoryCommand::DeleteWorkload { kind, id } => {
            if let Some(w) = load_workload(txn, *kind, id)? {
                if let Some(pair) = crate::replication::pair_using(txn, &w)? {
                    return Ok(Err(CommandError::Conflict(format!(
                        "{} '{id}' is replicated by pair '{pair}': remove its replication \
                         (the family's replica, protected instance or share replica) first",
                        kind.as_str()
                    ))));
                }
            }
            delete_workload(txn, *kind, id)
        }
        InventoryCommand::Reserve {
            host,
            holder,
            resources,
        } => {
            let mut h = match check_reserve(txn, host, holder, resources)? {
                Ok(h) => h,
                Err(e) => return Ok(Err(e)),
            };
            put_reservation(txn, &mut h, holder, resources, now)?;
            Ok(Ok(Outcome::Host(Box::new(h))))
        }
        InventoryCommand::Release { host, holder } => {
            let Some(mut h) = txn.get_record::<Host>(CF_HOSTS, host.as_bytes())? else {
                return Ok(Err(not_found("host", host)));
            };
            if h.reservations.remove(holder).is_some() {
                h.updated_at_ms = now;
                txn.put_record(CF_HOSTS, host.as_bytes(), &h)?;
                txn.delete(
                    CF_RESERVATIONS_BY_HOLDER,
                    &pair_key(holder, host.as_bytes()),
                )?;
            }
            Ok(Ok(Outcome::Host(Box::new(h))))
        }
    }
}

fn register_host(
    txn: &mut Txn<'_>,
    reg: &HostRegistration,
    now: u64,
) -> Result<CommandResult, StoreError> {
    if txn.get(CF_SITES, reg.site.as_bytes())?.is_none() {
        return Ok(Err(not_found("site", &reg.site)));
    }
    let existing = txn.get_record::<Host>(CF_HOSTS, reg.name.as_bytes())?;
    let mut host = match existing {
        Some(h) => {
            if h.site != reg.site {
                txn.delete(CF_HOSTS_BY_SITE, &pair_key(&h.site, h.name.as_bytes()))?;
            }
            h
        }
        None => Host {
            name: reg.name.clone(),
            site: reg.site.clone(),
            state: HostState::Offline,
            driver: reg.driver,
            agent_address: String::new(),
            capacity: Capacity::default(),
            allocated: Allocation::default(),
            reservations: BTreeMap::new(),
            last_heartbeat_ms: None,
            registered_at_ms: now,
            updated_at_ms: now,
        },
    };
    host.site = reg.site.clone();
    host.driver = reg.driver;
    host.agent_address = reg.agent_address.clone();
    host.capacity = reg.capacity.clone();
    match reg.state {
        Some(HostState::Online) => {
            host.state = HostState::Online;
            host.last_heartbeat_ms = Some(now);
        }
        Some(HostState::Offline) => host.state = HostState::Offline,
        None => {}
    }
    host.updated_at_ms = now;
    txn.put_record(CF_HOSTS, host.name.as_bytes(), &host)?;
    txn.put(
        CF_HOSTS_BY_SITE,
        &pair_key(&host.site, host.name.as_bytes()),
        Vec::new(),
    )?;
    Ok(Ok(Outcome::Host(Box::new(host))))
}

fn delete_host(txn: &mut Txn<'_>, name: &str) -> Result<CommandResult, StoreError> {
    let Some(host) = txn.get_record::<Host>(CF_HOSTS, name.as_bytes())? else {
        return Ok(Err(not_found("host", name)));
    };
    let workloads = txn.scan_prefix_limit(CF_WORKLOADS_BY_HOST, &prefix_of(name), 1)?;
    if !workloads.is_empty() {
        return Ok(Err(CommandError::Conflict(format!(
            "host '{name}' still has workloads; delete or move them first"
        ))));
    }
    let tasks = crate::jobs::tasks_on_host_txn(txn, name, 1)?;
    if !tasks.is_empty() {
        return Ok(Err(CommandError::Conflict(format!(
            "host '{name}' still has assigned tasks (e.g. '{}'); wait for them or cancel their jobs",
            tasks[0]
        ))));
    }
    if let Some(holder) = host.reservations.keys().next() {
        return Ok(Err(CommandError::Conflict(format!(
            "host '{name}' still has {} reservation(s) (e.g. held by '{holder}'); release them first",
            host.reservations.len()
        ))));
    }
    txn.delete(CF_HOSTS, name.as_bytes())?;
    txn.delete(CF_HOSTS_BY_SITE, &pair_key(&host.site, name.as_bytes()))?;
    Ok(Ok(Outcome::Done))
}

/// Whether a site still has hosts (a site with hosts cannot be deleted): the name of one.
pub(crate) fn host_in_site(txn: &Txn<'_>, site: &str) -> Result<Option<String>, StoreError> {
    let found = txn.scan_prefix_limit(CF_HOSTS_BY_SITE, &prefix_of(site), 1)?;
    Ok(found
        .first()
        .map(|(k, _)| String::from_utf8_lossy(&k[site.len() + 1..]).into_owned()))
}

fn load_workload(
    txn: &Txn<'_>,
    kind: WorkloadKind,
    id: &str,
) -> Result<Option<Workload>, StoreError> {
    let key = id.as_bytes();
    Ok(match kind {
        WorkloadKind::Server => txn.get_record(CF_SERVERS, key)?.map(Workload::Server),
        WorkloadKind::Share => txn.get_record(CF_SHARES, key)?.map(Workload::Share),
        WorkloadKind::Database => txn.get_record(CF_DATABASES, key)?.map(Workload::Database),
    })
}

fn put_workload(txn: &mut Txn<'_>, w: &Workload) -> Result<(), StoreError> {
    let key = w.id().as_bytes();
    match w {
        Workload::Server(s) => txn.put_record(CF_SERVERS, key, s),
        Workload::Share(s) => txn.put_record(CF_SHARES, key, s),
        Workload::Database(d) => txn.put_record(CF_DATABASES, key, d),
    }
}

fn add_allocation(host: &mut Host, a: Allocation, sign_add: bool) {
    if sign_add {
        host.allocated.vcpus = host.allocated.vcpus.saturating_add(a.vcpus);
        host.allocated.ram_mb = host.allocated.ram_mb.saturating_add(a.ram_mb);
    } else {
        host.allocated.vcpus = host.allocated.vcpus.saturating_sub(a.vcpus);
        host.allocated.ram_mb = host.allocated.ram_mb.saturating_sub(a.ram_mb);
    }
}

fn register_workloads(
    txn: &mut Txn<'_>,
    workloads: &[Workload],
    now: u64,
) -> Result<CommandResult, StoreError> {
    // Check everything first: all or none.
    let mut hosts: BTreeMap<String, Host> = BTreeMap::new();
    for w in workloads {
        let host = match hosts.get(w.host()) {
            Some(h) => h,
            None => match txn.get_record::<Host>(CF_HOSTS, w.host().as_bytes())? {
                Some(h) => hosts.entry(w.host().to_string()).or_insert(h),
                None => return Ok(Err(not_found("host", w.host()))),
            },
        };
        for pool in w.pools() {
            if host.pool(pool).is_none() {
                return Ok(Err(not_found(
                    "storage pool",
                    &format!("{}/{pool}", w.host()),
                )));
            }
        }
    }
    let mut previous = Vec::with_capacity(workloads.len());
    for w in workloads {
        let old = load_workload(txn, w.kind(), w.id())?;
        if let Some(old) = &old {
            if !hosts.contains_key(old.host()) {
                if let Some(h) = txn.get_record::<Host>(CF_HOSTS, old.host().as_bytes())? {
                    hosts.insert(old.host().to_string(), h);
                }
            }
        }
        previous.push(old);
    }
    let mut touched: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(workloads.len());
    for (w, old) in workloads.iter().zip(previous) {
        let mut w = w.clone();
        let created = old.as_ref().map_or(now, Workload::created_at_ms);
        w.set_times(created, now);
        if let Some(old) = &old {
            if let Some(h) = hosts.get_mut(old.host()) {
                add_allocation(h, old.allocation(), false);
                touched.insert(old.host().to_string());
            }
            if old.host() != w.host() {
                txn.delete(
                    CF_WORKLOADS_BY_HOST,
                    &workload_index_key(old.host(), old.kind(), old.id()),
                )?;
            }
            if old.project() != w.project() {
                txn.delete(
                    CF_WORKLOADS_BY_PROJECT,
                    &workload_index_key(old.project(), old.kind(), old.id()),
                )?;
            }
        }
        if let Some(h) = hosts.get_mut(w.host()) {
            add_allocation(h, w.allocation(), true);
            touched.insert(w.host().to_string());
        }
        put_workload(txn, &w)?;
        txn.put(
            CF_WORKLOADS_BY_HOST,
            &workload_index_key(w.host(), w.kind(), w.id()),
            Vec::new(),
        )?;
        txn.put(
            CF_WORKLOADS_BY_PROJECT,
            &workload_index_key(w.project(), w.kind(), w.id()),
            Vec::new(),
        )?;
        out.push(w);
    }
    for name in touched {
        if let Some(h) = hosts.get(&name) {
            txn.put_record(CF_HOSTS, name.as_bytes(), h)?;
        }
    }
    Ok(Ok(Outcome::Workloads(out)))
}

fn delete_workload(
    txn: &mut Txn<'_>,
    kind: WorkloadKind,
    id: &str,
) -> Result<CommandResult, StoreError> {
    let Some(old) = load_workload(txn, kind, id)? else {
        return Ok(Err(not_found(kind.as_str(), id)));
    };
    if let Some(mut h) = txn.get_record::<Host>(CF_HOSTS, old.host().as_bytes())? {
        add_allocation(&mut h, old.allocation(), false);
        txn.put_record(CF_HOSTS, old.host().as_bytes(), &h)?;
    }
    txn.delete(kind.cf(), id.as_bytes())?;
    txn.delete(
        CF_WORKLOADS_BY_HOST,
        &workload_index_key(old.host(), kind, id),
    )?;
    txn.delete(
        CF_WORKLOADS_BY_PROJECT,
        &workload_index_key(old.project(), kind, id),
    )?;
    Ok(Ok(Outcome::Done))
}

/// Checks that `holder` may reserve `req` on `host`; returns the host record. Stages
/// nothing (for composite commands: check everything, then write).
pub(crate) fn check_reserve(
    txn: &Txn<'_>,
    host: &str,
    holder: &str,
    req: &ResourceAmount,
) -> Result<Result<Host, CommandError>, StoreError> {
    let Some(h) = txn.get_record::<Host>(CF_HOSTS, host.as_bytes())? else {
        return Ok(Err(not_found("host", host)));
    };
    let avail = h.available_excluding(Some(holder));
    let reserved = h.reserved();
    let short = |what: &str, requested: u64, available: u64, detail: String| {
        CommandError::Conflict(format!(
            "insufficient {what} on host '{host}': {requested} requested, {available} available ({detail})"
        ))
    };
    if req.vcpus > avail.vcpus {
        return Ok(Err(short(
            "vcpus",
            u64::from(req.vcpus),
            u64::from(avail.vcpus),
            format!(
                "{} total, {} allocated, {} reserved",
                h.capacity.vcpus, h.allocated.vcpus, reserved.vcpus
            ),
        )));
    }
    if req.ram_mb > avail.ram_mb {
        return Ok(Err(short(
            "ram_mb",
            req.ram_mb,
            avail.ram_mb,
            format!(
                "{} total, {} allocated, {} reserved",
                h.capacity.ram_mb, h.allocated.ram_mb, reserved.ram_mb
            ),
        )));
    }
    for (pool, bytes) in &req.pool_bytes {
        let Some(p) = h.pool(pool) else {
            return Ok(Err(not_found("storage pool", &format!("{host}/{pool}"))));
        };
        let available = avail.pool_bytes.get(pool).copied().unwrap_or(0);
        if *bytes > available {
            return Ok(Err(short(
                &format!("storage in pool '{pool}'"),
                *bytes,
                available,
                format!(
                    "{} free, {} reserved, bytes",
                    p.free_bytes,
                    reserved.pool_bytes.get(pool).copied().unwrap_or(0)
                ),
            )));
        }
    }
    Ok(Ok(h))
}

/// Stages `holder`'s reservation on `host` (after [`check_reserve`]).
pub(crate) fn put_reservation(
    txn: &mut Txn<'_>,
    host: &mut Host,
    holder: &str,
    req: &ResourceAmount,
    now: u64,
) -> Result<(), StoreError> {
    let created = host
        .reservations
        .get(holder)
        .map_or(now, |r| r.created_at_ms);
    host.reservations.insert(
        holder.to_string(),
        Reservation {
            resources: req.clone(),
            created_at_ms: created,
        },
    );
    host.updated_at_ms = now;
    txn.put_record(CF_HOSTS, host.name.as_bytes(), host)?;
    txn.put(
        CF_RESERVATIONS_BY_HOLDER,
        &pair_key(holder, host.name.as_bytes()),
        Vec::new(),
    )?;
    Ok(())
}

/// Releases every reservation held by `holder`, on every host (a job's, when it ends).
pub(crate) fn release_holder(txn: &mut Txn<'_>, holder: &str, now: u64) -> Result<(), StoreError> {
    let prefix = prefix_of(holder);
    for (key, _) in txn.scan_prefix(CF_RESERVATIONS_BY_HOLDER, &prefix)? {
        let host = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        if let Some(mut h) = txn.get_record::<Host>(CF_HOSTS, host.as_bytes())? {
            if h.reservations.remove(holder).is_some() {
                h.updated_at_ms = now;
                txn.put_record(CF_HOSTS, host.as_bytes(), &h)?;
            }
        }
        txn.delete(CF_RESERVATIONS_BY_HOLDER, &key)?;
    }
    Ok(())
}

/// The host record as apply sees it (for other modules' checks).
pub(crate) fn host_txn(txn: &Txn<'_>, name: &str) -> Result<Option<Host>, StoreError> {
    txn.get_record(CF_HOSTS, name.as_bytes())
}

/// For the families' composite commands: creates or replaces database instance records,
/// all or none, exactly as `RegisterWorkloads` does (hosts and pools checked first;
/// allocations kept right).
pub(crate) fn put_databases(
    txn: &mut Txn<'_>,
    dbs: &[DatabaseInstance],
    now: u64,
) -> Result<Result<(), CommandError>, StoreError> {
    let workloads: Vec<Workload> = dbs.iter().cloned().map(Workload::Database).collect();
    Ok(register_workloads(txn, &workloads, now)?.map(|_| ()))
}

/// For the families' composite commands: removes a database instance record, exactly as
/// `DeleteWorkload` does.
pub(crate) fn delete_database(
    txn: &mut Txn<'_>,
    id: &str,
) -> Result<Result<(), CommandError>, StoreError> {
    Ok(delete_workload(txn, WorkloadKind::Database, id)?.map(|_| ()))
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

/// Which workloads to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadFilter {
    pub project: Option<String>,
    pub host: Option<String>,
}

impl Store {
    /// Up to `limit` keys starting with `prefix`, in key order (index families hold
    /// empty values, which are not records).
    pub(crate) fn scan_keys(
        &self,
        cf: &'static str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let handle = self
            .db
            .cf_handle(cf)
            .ok_or(StoreError::MissingColumnFamily(cf))?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            handle,
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        ) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(k.to_vec());
        }
        Ok(out)
    }

    pub fn get_host(&self, name: &str) -> Result<Option<Host>, StoreError> {
        self.get_record(CF_HOSTS, name.as_bytes())
    }

    /// Every host, by name.
    pub fn list_hosts(&self) -> Result<Vec<Host>, StoreError> {
        Ok(self
            .scan_prefix::<Host>(CF_HOSTS, b"")?
            .into_iter()
            .map(|(_, h)| h)
            .collect())
    }

    /// The hosts of one site, by name.
    pub fn list_hosts_in_site(&self, site: &str) -> Result<Vec<Host>, StoreError> {
        let prefix = prefix_of(site);
        let mut out = Vec::new();
        for key in self.scan_keys(CF_HOSTS_BY_SITE, &prefix, usize::MAX)? {
            if let Some(h) = self.get_host(&String::from_utf8_lossy(&key[prefix.len()..]))? {
                out.push(h);
            }
        }
        Ok(out)
    }

    pub fn get_server(&self, id: &str) -> Result<Option<Server>, StoreError> {
        self.get_record(CF_SERVERS, id.as_bytes())
    }

    pub fn get_share(&self, id: &str) -> Result<Option<Share>, StoreError> {
        self.get_record(CF_SHARES, id.as_bytes())
    }

    pub fn get_database(&self, id: &str) -> Result<Option<DatabaseInstance>, StoreError> {
        self.get_record(CF_DATABASES, id.as_bytes())
    }

    pub fn get_workload(
        &self,
        kind: WorkloadKind,
        id: &str,
    ) -> Result<Option<Workload>, StoreError> {
        Ok(match kind {
            WorkloadKind::Server => self.get_server(id)?.map(Workload::Server),
            WorkloadKind::Share => self.get_share(id)?.map(Workload::Share),
            WorkloadKind::Database => self.get_database(id)?.map(Workload::Database),
        })
    }

    /// Workloads of one kind, by id, narrowed by project and host.
    pub fn list_workloads(
        &self,
        kind: WorkloadKind,
        filter: &WorkloadFilter,
    ) -> Result<Vec<Workload>, StoreError> {
        let via_index = |cf: &'static str, owner: &str| -> Result<Vec<Workload>, StoreError> {
            let mut prefix = prefix_of(owner);
            prefix.push(kind.tag());
            let mut out = Vec::new();
            for key in self.scan_keys(cf, &prefix, usize::MAX)? {
                let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                if let Some(w) = self.get_workload(kind, &id)? {
                    out.push(w);
                }
            }
            Ok(out)
        };
        let all = match (&filter.project, &filter.host) {
            (Some(p), _) => via_index(CF_WORKLOADS_BY_PROJECT, p)?,
            (None, Some(h)) => via_index(CF_WORKLOADS_BY_HOST, h)?,
            (None, None) => match kind {
                WorkloadKind::Server => self
                    .scan_prefix::<Server>(CF_SERVERS, b"")?
                    .into_iter()
                    .map(|(_, s)| Workload::Server(s))
                    .collect(),
                WorkloadKind::Share => self
                    .scan_prefix::<Share>(CF_SHARES, b"")?
                    .into_iter()
                    .map(|(_, s)| Workload::Share(s))
                    .collect(),
                WorkloadKind::Database => self
                    .scan_prefix::<DatabaseInstance>(CF_DATABASES, b"")?
                    .into_iter()
                    .map(|(_, d)| Workload::Database(d))
                    .collect(),
            },
        };
        Ok(all
            .into_iter()
            .filter(|w| filter.host.as_deref().is_none_or(|h| w.host() == h))
            .collect())
    }

    pub fn list_servers(&self, filter: &WorkloadFilter) -> Result<Vec<Server>, StoreError> {
        Ok(self
            .list_workloads(WorkloadKind::Server, filter)?
            .into_iter()
            .filter_map(|w| match w {
                Workload::Server(s) => Some(s),
                _ => None,
            })
            .collect())
    }

    pub fn list_shares(&self, filter: &WorkloadFilter) -> Result<Vec<Share>, StoreError> {
        Ok(self
            .list_workloads(WorkloadKind::Share, filter)?
            .into_iter()
            .filter_map(|w| match w {
                Workload::Share(s) => Some(s),
                _ => None,
            })
            .collect())
    }

    pub fn list_databases(
        &self,
        filter: &WorkloadFilter,
    ) -> Result<Vec<DatabaseInstance>, StoreError> {
        Ok(self
            .list_workloads(WorkloadKind::Database, filter)?
            .into_iter()
            .filter_map(|w| match w {
                Workload::Database(d) => Some(d),
                _ => None,
            })
            .collect())
    }

    /// Every workload on a host (servers, then shares, then databases; by id).
    pub fn workloads_on_host(&self, host: &str) -> Result<Vec<Workload>, StoreError> {
        let prefix = prefix_of(host);
        let mut out = Vec::new();
        for key in self.scan_keys(CF_WORKLOADS_BY_HOST, &prefix, usize::MAX)? {
            let rest = &key[prefix.len()..];
            let Some((tag, id)) = rest.split_first() else {
                continue;
            };
            let Some(kind) = WorkloadKind::from_tag(*tag) else {
                continue;
            };
            if let Some(w) = self.get_workload(kind, &String::from_utf8_lossy(id))? {
                out.push(w);
            }
        }
        // Index order is by tag byte (d, h, s); present servers first.
        out.sort_by(|a, b| (a.kind(), a.id()).cmp(&(b.kind(), b.id())));
        Ok(out)
    }

    /// Every reservation `holder` has: (host name, reservation).
    pub fn reservations_of(&self, holder: &str) -> Result<Vec<(String, Reservation)>, StoreError> {
        let prefix = prefix_of(holder);
        let mut out = Vec::new();
        for key in self.scan_keys(CF_RESERVATIONS_BY_HOLDER, &prefix, usize::MAX)? {
            let host = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if let Some(h) = self.get_host(&host)? {
                if let Some(r) = h.reservations.get(holder) {
                    out.push((host, r.clone()));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::jobs::testkit::{new_job, registration, sleep_task, Fixture, T0};

    fn fixture() -> Fixture {
        let f = Fixture::new();
        f.site("s1");
        f.site("s2");
        f.host("h1", "s1");
        f
    }

    fn host(f: &Fixture, name: &str) -> Host {
        f.store.get_host(name).expect("read").expect("host exists")
    }

    fn server(id: &str, host: &str, vcpus: u32, ram_mb: u64) -> Workload {
        Workload::Server(Server {
            id: id.into(),
            project: "proj1".into(),
            name: format!("vm {id}"),
            host: host.into(),
            status: ServerStatus::Active,
            flavor: Flavor { vcpus, ram_mb },
            disks: vec![Disk {
                id: format!("{id}-root"),
                size_bytes: 10 << 30,
                pool: "p1".into(),
                path: format!("/data/{id}.img"),
            }],
            created_at_ms: 0,
            updated_at_ms: 0,
        })
    }

    fn share(id: &str, host: &str, project: &str) -> Workload {
        Workload::Share(Share {
            id: id.into(),
            project: project.into(),
            name: "files".into(),
            host: host.into(),
            pool: "p1".into(),
            size_bytes: 1 << 30,
            path: "/data/share".into(),
            status: ShareStatus::Available,
            created_at_ms: 0,
            updated_at_ms: 0,
        })
    }

    fn register(f: &Fixture, workloads: Vec<Workload>) -> CommandResult {
        f.inv(InventoryCommand::RegisterWorkloads { workloads })
    }

    fn reserve(f: &Fixture, host: &str, holder: &str, r: ResourceAmount) -> CommandResult {
        f.inv(InventoryCommand::Reserve {
            host: host.into(),
            holder: holder.into(),
            resources: r,
        })
    }

    fn conflict(r: CommandResult) -> String {
        match r {
            Err(CommandError::Conflict(m)) => m,
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn registering_a_host_needs_its_site_and_is_an_upsert() {
        let mut f = fixture();
        let r = f.inv(InventoryCommand::RegisterHost(Box::new(registration(
            "h9", "nowhere",
        ))));
        assert_eq!(
            r,
            Err(CommandError::NotFound {
                kind: "site".into(),
                id: "nowhere".into()
            })
        );
        assert!(f.store.get_host("h9").expect("read").is_none());

        let h = host(&f, "h1");
        assert_eq!(h.state, HostState::Online);
        assert_eq!(h.last_heartbeat_ms, Some(T0));
        assert_eq!(h.registered_at_ms, T0);
        reserve(
            &f,
            "h1",
            "pair-1",
            ResourceAmount {
                vcpus: 1,
                ..Default::default()
            },
        )
        .expect("reserve");

        // Re-registration (agent restart) moves it to s2 with new capacity; keeps the
        // reservation and the registration time.
        f.now += 1000;
        let mut reg = registration("h1", "s2");
        reg.capacity.vcpus = 32;
        reg.state = None;
        f.inv(InventoryCommand::RegisterHost(Box::new(reg)))
            .expect("re-register");
        let h = host(&f, "h1");
        assert_eq!(h.site, "s2");
        assert_eq!(h.capacity.vcpus, 32);
        assert_eq!(h.registered_at_ms, T0);
        assert_eq!(h.updated_at_ms, T0 + 1000);
        assert_eq!(
            h.last_heartbeat_ms,
            Some(T0),
            "no state given: no heartbeat"
        );
        assert_eq!(h.reservations.len(), 1);
        let names = |site: &str| -> Vec<String> {
            f.store
                .list_hosts_in_site(site)
                .expect("list")
                .into_iter()
                .map(|h| h.name)
                .collect()
        };
        assert!(names("s1").is_empty());
        assert_eq!(names("s2"), vec!["h1"]);

        // A host registered by hand without a state starts offline.
        let mut manual = registration("h2", "s1");
        manual.state = None;
        manual.driver = Driver::None;
        f.inv(InventoryCommand::RegisterHost(Box::new(manual)))
            .expect("register");
        let h2 = host(&f, "h2");
        assert_eq!(h2.state, HostState::Offline);
        assert_eq!(h2.last_heartbeat_ms, None);
        assert_eq!(f.store.list_hosts().expect("list").len(), 2);
    }

    #[test]
    fn heartbeats_and_offline_marking() {
        let mut f = fixture();
        f.now += 5000;
        let pools = vec![StoragePool {
            name: "p1".into(),
            total_bytes: 100 << 30,
            free_bytes: 10 << 30,
        }];
        f.inv(InventoryCommand::Heartbeat {
            name: "h1".into(),
            pools: Some(pools.clone()),
        })
        .expect("heartbeat");
        let h = host(&f, "h1");
        assert_eq!(h.last_heartbeat_ms, Some(T0 + 5000));
        assert_eq!(h.capacity.pools, pools);

        // The scheduler saw no heartbeat since T0 + 3000, but one arrived at T0 + 5000.
        let m = conflict(f.inv(InventoryCommand::MarkHostOffline {
            name: "h1".into(),
            if_no_heartbeat_since_ms: Some(T0 + 3000),
        }));
        assert!(m.contains("stays online"), "{m}");
        assert!(host(&f, "h1").is_online());
        f.inv(InventoryCommand::MarkHostOffline {
            name: "h1".into(),
            if_no_heartbeat_since_ms: Some(T0 + 5001),
        })
        .expect("offline");
        assert_eq!(host(&f, "h1").state, HostState::Offline);
        f.inv(InventoryCommand::Heartbeat {
            name: "h1".into(),
            pools: None,
        })
        .expect("back");
        assert!(host(&f, "h1").is_online());
        assert!(matches!(
            f.inv(InventoryCommand::Heartbeat {
                name: "ghost".into(),
                pools: None
            }),
            Err(CommandError::NotFound { .. })
        ));
    }

    #[test]
    fn workloads_are_upserted_and_counted_on_their_host() {
        let mut f = fixture();
        f.host("h2", "s2");
        register(
            &f,
            vec![server("vm1", "h1", 2, 2048), share("sh1", "h1", "proj2")],
        )
        .expect("register");
        assert_eq!(
            host(&f, "h1").allocated,
            Allocation {
                vcpus: 2,
                ram_mb: 2048
            }
        );
        let s = f.store.get_server("vm1").expect("read").expect("vm1");
        assert_eq!(s.created_at_ms, T0);

        // Resize and move to h2 (a finished migration): the allocation follows.
        f.now += 10;
        register(&f, vec![server("vm1", "h2", 4, 4096)]).expect("move");
        assert_eq!(host(&f, "h1").allocated, Allocation::default());
        assert_eq!(host(&f, "h2").allocated.vcpus, 4);
        let s = f.store.get_server("vm1").expect("read").expect("vm1");
        assert_eq!((s.created_at_ms, s.updated_at_ms), (T0, T0 + 10));
        let on = |h: &str| -> Vec<String> {
            f.store
                .workloads_on_host(h)
                .expect("on host")
                .iter()
                .map(|w| w.id().to_string())
                .collect()
        };
        assert_eq!(on("h1"), vec!["sh1"]);
        assert_eq!(on("h2"), vec!["vm1"]);
        let by_project = |p: &str| {
            f.store
                .list_workloads(
                    WorkloadKind::Share,
                    &WorkloadFilter {
                        project: Some(p.into()),
                        host: None,
                    },
                )
                .expect("list")
                .len()
        };
        assert_eq!(by_project("proj2"), 1);
        assert_eq!(by_project("proj1"), 0);
        assert_eq!(
            f.store
                .list_servers(&WorkloadFilter {
                    project: Some("proj1".into()),
                    host: Some("h1".into()),
                })
                .expect("list")
                .len(),
            0
        );
        assert_eq!(
            f.store
                .list_servers(&WorkloadFilter::default())
                .expect("list")
                .len(),
            1
        );

        f.inv(InventoryCommand::DeleteWorkload {
            kind: WorkloadKind::Server,
            id: "vm1".into(),
        })
        .expect("delete");
        assert_eq!(host(&f, "h2").allocated, Allocation::default());
        assert!(on("h2").is_empty());
        assert!(matches!(
            f.inv(InventoryCommand::DeleteWorkload {
                kind: WorkloadKind::Server,
                id: "vm1".into(),
            }),
            Err(CommandError::NotFound { .. })
        ));
    }

    #[test]
    fn an_agents_report_creates_new_workloads_and_keeps_known_ones() {
        let f = Fixture::new();
        f.site("s1");
        f.host("h1", "s1");
        f.host("h2", "s1");
        // The control plane moved vm-1 to h2 and stopped it.
        let mut moved = server("vm-1", "h2", 2, 2048);
        if let Workload::Server(s) = &mut moved {
            s.status = ServerStatus::Shutoff;
        }
        register(&f, vec![moved]).expect("register");
        // h1's agent restarts with its old configuration: vm-1 on h1 and running, and a
        // new vm-2.
        let r = f.inv(InventoryCommand::ReportWorkloads {
            workloads: vec![server("vm-1", "h1", 2, 2048), server("vm-2", "h1", 1, 1024)],
        });
        match r {
            Ok(Outcome::Workloads(created)) => {
                let ids: Vec<&str> = created.iter().map(Workload::id).collect();
                assert_eq!(ids, vec!["vm-2"]);
            }
            other => panic!("{other:?}"),
        }
        let vm1 = f.store.get_server("vm-1").expect("read").expect("vm-1");
        assert_eq!(vm1.host, "h2");
        assert_eq!(vm1.status, ServerStatus::Shutoff);
        assert!(f.store.get_server("vm-2").expect("read").is_some());
        let h1 = f.store.get_host("h1").expect("read").expect("h1");
        assert_eq!(h1.allocated.vcpus, 1, "only vm-2 counts on h1");
    }

    #[test]
    fn workload_registration_is_all_or_nothing() {
        let f = fixture();
        let r = register(
            &f,
            vec![server("vm1", "h1", 1, 1), server("vm2", "ghost", 1, 1)],
        );
        assert!(matches!(r, Err(CommandError::NotFound { ref kind, .. }) if kind == "host"));
        assert!(f.store.get_server("vm1").expect("read").is_none());
        assert_eq!(host(&f, "h1").allocated, Allocation::default());

        let mut bad_pool = server("vm3", "h1", 1, 1);
        if let Workload::Server(s) = &mut bad_pool {
            s.disks[0].pool = "p9".into();
        }
        let r = register(&f, vec![bad_pool]);
        assert!(
            matches!(r, Err(CommandError::NotFound { ref kind, ref id }) if kind == "storage pool" && id == "h1/p9")
        );
        // Stateless checks.
        let dup = InventoryCommand::RegisterWorkloads {
            workloads: vec![server("vm1", "h1", 1, 1), server("vm1", "h1", 1, 1)],
        };
        assert!(matches!(dup.validate(), Err(CommandError::Invalid { .. })));
        assert!(InventoryCommand::RegisterWorkloads { workloads: vec![] }
            .validate()
            .is_err());
    }

    #[test]
    fn reservations_are_refused_when_short_naming_what_is_short() {
        let f = fixture();
        register(&f, vec![server("vm1", "h1", 4, 8192)]).expect("register");
        // h1: 8 vCPUs, 16384 MB, pool p1 with 50 GiB free; vm1 takes 4 vCPUs, 8192 MB.
        reserve(
            &f,
            "h1",
            "a",
            ResourceAmount {
                vcpus: 3,
                ram_mb: 4096,
                pool_bytes: BTreeMap::from([("p1".into(), 40 << 30)]),
            },
        )
        .expect("fits");
        let m = conflict(reserve(
            &f,
            "h1",
            "b",
            ResourceAmount {
                vcpus: 2,
                ..Default::default()
            },
        ));
        assert_eq!(
            m,
            "insufficient vcpus on host 'h1': 2 requested, 1 available (8 total, 4 allocated, 3 reserved)"
        );
        let m = conflict(reserve(
            &f,
            "h1",
            "b",
            ResourceAmount {
                ram_mb: 5000,
                ..Default::default()
            },
        ));
        assert!(
            m.starts_with("insufficient ram_mb on host 'h1': 5000 requested, 4096 available"),
            "{m}"
        );
        let m = conflict(reserve(
            &f,
            "h1",
            "b",
            ResourceAmount {
                pool_bytes: BTreeMap::from([("p1".into(), 20 << 30)]),
                ..Default::default()
            },
        ));
        assert!(
            m.starts_with("insufficient storage in pool 'p1' on host 'h1'"),
            "{m}"
        );
        assert!(matches!(
            reserve(
                &f,
                "h1",
                "b",
                ResourceAmount {
                    pool_bytes: BTreeMap::from([("p7".into(), 1)]),
                    ..Default::default()
                },
            ),
            Err(CommandError::NotFound { .. })
        ));
        // The refusals left nothing behind.
        assert_eq!(host(&f, "h1").reservations.len(), 1);
        // Replacing a holder's own reservation counts the old one as free.
        reserve(
            &f,
            "h1",
            "a",
            ResourceAmount {
                vcpus: 4,
                ..Default::default()
            },
        )
        .expect("replace");
        let h = host(&f, "h1");
        assert_eq!(h.reserved().vcpus, 4);
        assert_eq!(h.available().vcpus, 0);
        assert_eq!(h.available().pool_bytes.get("p1"), Some(&(50 << 30)));
        // Release is idempotent.
        for _ in 0..2 {
            f.inv(InventoryCommand::Release {
                host: "h1".into(),
                holder: "a".into(),
            })
            .expect("release");
        }
        assert!(host(&f, "h1").reservations.is_empty());
        assert!(f.store.reservations_of("a").expect("res").is_empty());
    }

    #[test]
    fn hosts_and_sites_in_use_cannot_be_deleted() {
        let f = fixture();
        register(&f, vec![share("sh1", "h1", "proj1")]).expect("register");
        let m = conflict(f.inv(InventoryCommand::DeleteHost { name: "h1".into() }));
        assert!(m.contains("workloads"), "{m}");
        f.inv(InventoryCommand::DeleteWorkload {
            kind: WorkloadKind::Share,
            id: "sh1".into(),
        })
        .expect("delete share");

        f.create(new_job("j1", vec![sleep_task("t1", &[], 1)]));
        f.assign_ok("t1", "h1", 1);
        let m = conflict(f.inv(InventoryCommand::DeleteHost { name: "h1".into() }));
        assert!(m.contains("assigned tasks"), "{m}");
        f.jobs(crate::jobs::JobsCommand::CancelJob {
            job_id: "j1".into(),
            by: "t".into(),
        })
        .expect("cancel");

        reserve(
            &f,
            "h1",
            "x",
            ResourceAmount {
                vcpus: 1,
                ..Default::default()
            },
        )
        .expect("reserve");
        let m = conflict(f.inv(InventoryCommand::DeleteHost { name: "h1".into() }));
        assert!(m.contains("reservation"), "{m}");
        f.inv(InventoryCommand::Release {
            host: "h1".into(),
            holder: "x".into(),
        })
        .expect("release");

        let m = conflict(f.apply(Command::DeleteSite { name: "s1".into() }));
        assert!(m.contains("still has hosts"), "{m}");
        f.inv(InventoryCommand::DeleteHost { name: "h1".into() })
            .expect("delete host");
        assert!(f.store.get_host("h1").expect("read").is_none());
        f.apply(Command::DeleteSite { name: "s1".into() })
            .expect("delete site");
    }

    #[test]
    fn stateless_validation() {
        let mut reg = registration("bad name", "s1");
        assert!(InventoryCommand::RegisterHost(Box::new(reg.clone()))
            .validate()
            .is_err());
        reg.name = "h1".into();
        reg.capacity.pools[0].free_bytes = reg.capacity.pools[0].total_bytes + 1;
        let e = InventoryCommand::RegisterHost(Box::new(reg.clone()))
            .validate()
            .expect_err("free above total");
        assert!(e.to_string().contains("free_bytes"), "{e}");
        reg.capacity.pools[0].free_bytes = 0;
        reg.site = "-x".into();
        let e = InventoryCommand::RegisterHost(Box::new(reg))
            .validate()
            .expect_err("bad site");
        assert!(e.to_string().starts_with("invalid site"), "{e}");
        assert!(validate_id("id", "6f1f9185-b737-4e25-9a3b-0d1e2f3a4b5c").is_ok());
        assert!(validate_id("id", "a\0b").is_err());
        assert!(validate_project("0123456789abcdef0123456789abcdef").is_ok());
        assert!(validate_project("has space").is_err());
    }
}
