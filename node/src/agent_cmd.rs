//! `drplane agent`: run one host's agent (the runtime is `drplane_agent::runtime`).
//!
//! Settings come from flags, `DRPLANE_*` variables and an optional TOML file (`--config`),
//! in that order of precedence. The file may also declare storage pools, the simulated
//! driver's behaviour and the host's workloads (servers, shares, database instances),
//! whose volumes the agent creates through its driver (idempotently) before reporting them:
//!
//! ```toml
//! cluster = ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
//! host = "compute-1"
//! site = "site-a"
//! driver = "fs"                # or "sim"
//! data = "/var/lib/drplane-agent"
//! listen = "0.0.0.0:7401"      # the fs driver's block-sync service
//! vcpus = 16
//! ram_mb = 65536
//! [[pools]]
//! name = "default"
//! capacity_bytes = 1099511627776
//! [sim]                        # driver = "sim" only
//! latency_ms = 1
//! failure_rate = 0.0
//! [[servers]]
//! id = "vm-1"
//! project = "demo"
//! name = "web"
//! vcpus = 2
//! ram_mb = 2048
//! disks = [{ id = "vm-1-root", size_bytes = 1073741824 }]
//! [[shares]]
//! id = "share-1"
//! project = "demo"
//! name = "docs"
//! size_bytes = 1073741824
//! [[databases]]
//! id = "db-1"
//! project = "demo"
//! name = "orders"
//! vcpus = 2
//! ram_mb = 4096
//! datastore = { type = "mysql", version = "8.0" }
//! volume = { id = "db-1-data", size_bytes = 1073741824 }
//! ```
//!
//! Credentials for finding the leader (`GET /drplane/v1/cluster` needs an admin): `--token`
//! (`DRPLANE_TOKEN`), or `--user`/`--password` (`DRPLANE_USER`/`DRPLANE_PASSWORD`), which
//! log in again at every discovery, so a long-running agent never holds an expired token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use async_trait::async_trait;
use drplane_agent::runtime::{Agent, Discovery, RuntimeConfig, RuntimeError};
use drplane_agent::{
    AgentTls, CancellationToken, Driver, FsConfig, FsDriver, PoolConfig, SimConfig, SimDriver,
    SimNetwork, SyncServer, VolumeKind, VolumeSpec,
};
use drplane_statemachine::inventory::{
    DatabaseInstance, DatabaseStatus, Datastore, Disk, Flavor, Server, ServerStatus, Share,
    ShareStatus, Volume, Workload,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cli::{Api, Credentials, Req};

/// Which driver moves this host's data.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Real files under the data directory; block sync over gRPC.
    Fs,
    /// Simulated volumes (tests, scale runs).
    Sim,
}

#[derive(clap::Args, Debug, Default)]
pub struct AgentArgs {
    /// TOML file with the same keys as the flags, plus pools, sim settings and workloads.
    #[arg(long, env = "DRPLANE_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// URL(s) of cluster nodes to find the leader through, comma-separated.
    #[arg(long, env = "DRPLANE_CLUSTER", value_name = "URL[,URL…]")]
    pub cluster: Option<String>,
    /// This host's name (unique in the cluster).
    #[arg(long, env = "DRPLANE_AGENT_HOST")]
    pub host: Option<String>,
    /// The site (failure domain) the host is in; it must exist in the cluster.
    #[arg(long, env = "DRPLANE_AGENT_SITE")]
    pub site: Option<String>,
    /// The driver: fs or sim.
    #[arg(long, env = "DRPLANE_AGENT_DRIVER", value_enum)]
    pub driver: Option<DriverKind>,
    /// Data directory (volumes, the agent's own records).
    #[arg(long, env = "DRPLANE_AGENT_DATA")]
    pub data: Option<PathBuf>,
    /// Address of the fs driver's block-sync service, host:port (port 0 picks one).
    #[arg(long, env = "DRPLANE_AGENT_LISTEN")]
    pub listen: Option<String>,
    /// vCPUs reported (default: the machine's).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// RAM reported, in MiB (default: the machine's).
    #[arg(long)]
    pub ram_mb: Option<u64>,
    /// Token sent as X-Auth-Token to find the leader.
    #[arg(long, env = "DRPLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// User to log in as when no --token is given (an admin).
    #[arg(long, env = "DRPLANE_USER")]
    pub user: Option<String>,
    /// Password of --user (prefer the environment).
    #[arg(long, env = "DRPLANE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Project to log in to.
    #[arg(long, env = "DRPLANE_PROJECT")]
    pub login_project: Option<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "DRPLANE_LOG")]
    pub log: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "DRPLANE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// TLS: this agent's PEM certificate, issued by the cluster CA. With --tls-key and
    /// --tls-ca the agent reaches the nodes over HTTPS and mutual TLS, and serves and
    /// pulls block syncs over mutual TLS; give all three or none.
    #[arg(long, env = "DRPLANE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the PEM private key of --tls-cert.
    #[arg(long, env = "DRPLANE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the PEM certificate of the cluster CA.
    #[arg(long, env = "DRPLANE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum UrlList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cluster: Option<UrlList>,
    host: Option<String>,
    site: Option<String>,
    driver: Option<DriverKind>,
    data: Option<PathBuf>,
    listen: Option<String>,
    vcpus: Option<u32>,
    ram_mb: Option<u64>,
    log: Option<String>,
    log_format: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    #[serde(default)]
    pools: Vec<PoolFile>,
    sim: Option<SimFile>,
    #[serde(default)]
    servers: Vec<ServerFile>,
    #[serde(default)]
    shares: Vec<ShareFile>,
    #[serde(default)]
    databases: Vec<DatabaseFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    name: String,
    capacity_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimFile {
    latency_ms: Option<u64>,
    jitter_ms: Option<u64>,
    failure_rate: Option<f64>,
    bandwidth: Option<u64>,
    seed: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeFile {
    id: String,
    size_bytes: u64,
    pool: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    id: String,
    project: String,
    name: String,
    status: Option<ServerStatus>,
    vcpus: u32,
    ram_mb: u64,
    #[serde(default)]
    disks: Vec<VolumeFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareFile {
    id: String,
    project: String,
    name: String,
    pool: Option<String>,
    size_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseFile {
    id: String,
    project: String,
    name: String,
    vcpus: u32,
    ram_mb: u64,
    datastore: Datastore,
    volume: VolumeFile,
}

/// Settings after merging flags, environment and file.
struct Settings {
    cluster: String,
    host: String,
    site: String,
    driver: DriverKind,
    data: PathBuf,
    listen: SocketAddr,
    vcpus: u32,
    ram_mb: u64,
    credentials: Credentials,
    log: String,
    log_json: bool,
    tls: Option<crate::tls::TlsPaths>,
    pools: Vec<PoolFile>,
    sim: SimFile,
    servers: Vec<ServerFile>,
    shares: Vec<ShareFile>,
    databases: Vec<DatabaseFile>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("Settings")
            .field("cluster", &self.cluster)
            .field("host", &self.host)
            .field("site", &self.site)
            .field("driver", &self.driver)
            .field("data", &self.data)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl AgentArgs {
    fn settings(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let cluster = self.cluster.or(file.cluster.map(|c| match c {
            UrlList::One(s) => s,
            UrlList::Many(v) => v.join(","),
        }));
        let host = self.host.or(file.host);
        let site = self.site.or(file.site);
        let driver = self.driver.or(file.driver);
        let data = self.data.or(file.data);
        let mut missing = Vec::new();
        for (name, absent) in [
            ("cluster", cluster.is_none()),
            ("host", host.is_none()),
            ("site", site.is_none()),
            ("driver", driver.is_none()),
            ("data", data.is_none()),
        ] {
            if absent {
                missing.push(name);
            }
        }
        let (Some(cluster), Some(host), Some(site), Some(driver), Some(data)) =
            (cluster, host, site, driver, data)
        else {
            bail!(
                "missing settings: {} (give them as --flags, DRPLANE_* variables or keys in --config)",
                missing.join(", ")
            );
        };
        drplane_statemachine::inventory::validate_host_name("host", &host)
            .map_err(|e| anyhow::anyhow!("host: {e}"))?;
        drplane_statemachine::command::validate_site_name(&site)
            .map_err(|e| anyhow::anyhow!("site: {e}"))?;
        crate::cli::parse_endpoints(&cluster)?;
        let listen_text = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let listen: SocketAddr = {
            use std::net::ToSocketAddrs;
            listen_text
                .to_socket_addrs()
                .with_context(|| format!("listen address '{listen_text}'"))?
                .next()
                .with_context(|| format!("listen address '{listen_text}' resolves to nothing"))?
        };
        let credentials = match (self.token.filter(|t| !t.trim().is_empty()), self.user) {
            (Some(t), _) => Credentials::Token(t.trim().to_string()),
            (None, Some(user)) => match self.password {
                Some(password) => Credentials::Password {
                    user,
                    password,
                    project: self.login_project,
                },
                None => bail!("--user needs --password (or DRPLANE_PASSWORD)"),
            },
            (None, None) => Credentials::None,
        };
        let log_format = self
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            bail!("log format must be text or json, not '{log_format}'");
        }
        let tls = crate::tls::TlsPaths::from_parts(
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.tls_ca.or(file.tls_ca),
        )?;
        if driver == DriverKind::Fs && file.sim.is_some() {
            bail!("[sim] settings apply to driver = \"sim\" only");
        }
        Ok(Settings {
            cluster,
            host,
            site,
            driver,
            data,
            listen,
            vcpus: self.vcpus.or(file.vcpus).unwrap_or_else(machine_vcpus),
            ram_mb: self.ram_mb.or(file.ram_mb).unwrap_or_else(machine_ram_mb),
            credentials,
            log: self
                .log
                .or(file.log)
                .unwrap_or_else(|| "info,openraft=warn".into()),
            log_json: log_format == "json",
            tls,
            pools: file.pools,
            sim: file.sim.unwrap_or_default(),
            servers: file.servers,
            shares: file.shares,
            databases: file.databases,
        })
    }
}

fn machine_vcpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

fn machine_ram_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Written in the data directory on first start; a later start as another host or site is
/// refused (the directory's volumes belong to that host).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct AgentIdentity {
    host: String,
    site: String,
}

fn check_identity(data: &Path, host: &str, site: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating data directory {}", data.display()))?;
    let path = data.join("agent.json");
    let me = AgentIdentity {
        host: host.to_string(),
        site: site.to_string(),
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let stored: AgentIdentity = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            if stored != me {
                bail!(
                    "data directory {} belongs to host '{}' in site '{}', not host '{}' in site '{}'",
                    data.display(),
                    stored.host,
                    stored.site,
                    host,
                    site
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, serde_json::to_vec_pretty(&me)?)
                .with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn init_tracing(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Finds the leader through the HTTP API: `GET /drplane/v1/cluster`.
struct HttpDiscovery {
    cluster: String,
    /// The cluster CA (PEM file), for `https://` endpoints.
    ca: Option<PathBuf>,
    credentials: Credentials,
    next: std::sync::atomic::AtomicUsize,
}

/// One node gets this long to answer discovery (a paused node accepts connections but
/// never answers; the next one is tried).
const DISCOVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

#[async_trait]
impl Discovery for HttpDiscovery {
    async fn members(&self) -> Result<Vec<String>, RuntimeError> {
        let endpoints = crate::cli::parse_endpoints(&self.cluster)
            .map_err(|e| RuntimeError::Discovery(format!("{e:#}")))?;
        // Start at a different node each time, so one that hangs is not always first.
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut failures = Vec::new();
        for k in 0..endpoints.len() {
            let endpoint = &endpoints[(start + k) % endpoints.len()];
            // A fresh client each time: a password login is redone, so no token expires.
            let api = Api::with_ca(endpoint, self.ca.as_deref())
                .map_err(|e| RuntimeError::Discovery(format!("{e:#}")))?
                .with_credentials(self.credentials.clone());
            let answer = tokio::time::timeout(DISCOVERY_TIMEOUT, async {
                api.send(Req::get("/drplane/v1/cluster"))
                    .await
                    .and_then(|a| a.into_json())
            })
            .await;
            match answer {
                Ok(Ok(doc)) => {
                    let members = raft_addresses(&doc.value);
                    if !members.is_empty() {
                        return Ok(members);
                    }
                    failures.push(format!("{endpoint}: no members listed"));
                }
                Ok(Err(e)) => failures.push(format!("{endpoint}: {e:#}")),
                Err(_) => failures.push(format!(
                    "{endpoint}: no answer within {} s",
                    DISCOVERY_TIMEOUT.as_secs()
                )),
            }
        }
        Err(RuntimeError::Discovery(failures.join("; ")))
    }
}

/// The members' raft addresses from a cluster status, the leader's first.
fn raft_addresses(status: &Value) -> Vec<String> {
    let mut members: Vec<(bool, String)> = status
        .get("members")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| {
                    let raft = m.get("raft").and_then(Value::as_str)?;
                    let leader = m.get("leader").and_then(Value::as_bool).unwrap_or(false);
                    Some((!leader, raft.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    members.sort();
    members.into_iter().map(|(_, r)| r).collect()
}

/// The driver, its data service (kept alive while the agent runs) and a function giving
/// a volume's path for the inventory.
type VolumePath = Box<dyn Fn(&str) -> String + Send + Sync>;

async fn open_driver(
    s: &Settings,
    tls: Option<&AgentTls>,
) -> anyhow::Result<(Arc<dyn Driver>, SyncServer, VolumePath)> {
    match s.driver {
        DriverKind::Fs => {
            let config = FsConfig {
                data_dir: s.data.join("volumes"),
                pools: s
                    .pools
                    .iter()
                    .map(|p| PoolConfig {
                        name: p.name.clone(),
                        capacity_bytes: p.capacity_bytes,
                    })
                    .collect(),
                tls: tls.cloned(),
            };
            let driver = FsDriver::open(config)
                .await
                .with_context(|| format!("opening the fs driver in {}", s.data.display()))?;
            let server = driver
                .serve_sync_source(s.listen)
                .await
                .with_context(|| format!("starting the block-sync service on {}", s.listen))?;
            let d2 = driver.clone();
            let path: VolumePath = Box::new(move |id: &str| {
                d2.volume_path(id)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            });
            Ok((Arc::new(driver), server, path))
        }
        DriverKind::Sim => {
            let defaults = SimConfig::default();
            let cfg = SimConfig {
                host: s.host.clone(),
                seed: s.sim.seed.unwrap_or(defaults.seed),
                latency: s
                    .sim
                    .latency_ms
                    .map(std::time::Duration::from_millis)
                    .unwrap_or(defaults.latency),
                jitter: s
                    .sim
                    .jitter_ms
                    .map(std::time::Duration::from_millis)
                    .unwrap_or(defaults.jitter),
                failure_rate: s.sim.failure_rate.unwrap_or(defaults.failure_rate),
                bandwidth: s.sim.bandwidth.unwrap_or(defaults.bandwidth),
                pools: if s.pools.is_empty() {
                    defaults.pools
                } else {
                    s.pools
                        .iter()
                        .map(|p| (p.name.clone(), p.capacity_bytes.unwrap_or(1 << 40)))
                        .collect()
                },
                record_ops: false,
            };
            if !(0.0..=1.0).contains(&cfg.failure_rate) {
                bail!("sim.failure_rate must be between 0 and 1");
            }
            let driver = SimDriver::new(cfg, SimNetwork::new());
            let server = driver
                .serve_sync_source(s.listen)
                .await
                .context("registering the simulated data service")?;
            let host = s.host.clone();
            let path: VolumePath = Box::new(move |id: &str| format!("sim://{host}/{id}"));
            Ok((Arc::new(driver), server, path))
        }
    }
}

/// Creates the declared workloads' volumes (idempotently) and describes the workloads.
async fn workloads(
    s: &Settings,
    driver: &Arc<dyn Driver>,
    path: &VolumePath,
) -> anyhow::Result<Vec<Workload>> {
    let default_pool = match driver.inventory().await {
        Ok(inv) => inv
            .pools
            .first()
            .map(|p| p.name.clone())
            .unwrap_or_else(|| "default".into()),
        Err(e) => bail!("reading the driver's inventory: {e}"),
    };
    let ensure = |v: &VolumeFile, kind: VolumeKind| {
        let spec = VolumeSpec {
            id: v.id.clone(),
            kind,
            pool: v.pool.clone().unwrap_or_else(|| default_pool.clone()),
            size_bytes: v.size_bytes,
            reserve: false,
            read_only: false,
        };
        let driver = driver.clone();
        async move {
            driver
                .create_volume(&spec)
                .await
                .with_context(|| format!("creating volume '{}'", spec.id))
        }
    };
    let mut out = Vec::new();
    for srv in &s.servers {
        let mut disks = Vec::new();
        for d in &srv.disks {
            let info = ensure(d, VolumeKind::Disk).await?;
            disks.push(Disk {
                id: d.id.clone(),
                size_bytes: info.size_bytes.max(d.size_bytes),
                pool: info.pool,
                path: path(&d.id),
            });
        }
        out.push(Workload::Server(Server {
            id: srv.id.clone(),
            project: srv.project.clone(),
            name: srv.name.clone(),
            host: s.host.clone(),
            status: srv.status.unwrap_or(ServerStatus::Active),
            flavor: Flavor {
                vcpus: srv.vcpus,
                ram_mb: srv.ram_mb,
            },
            disks,
            created_at_ms: 0,
            updated_at_ms: 0,
        }));
    }
    for sh in &s.shares {
        let vf = VolumeFile {
            id: sh.id.clone(),
            size_bytes: sh.size_bytes,
            pool: sh.pool.clone(),
        };
        let info = ensure(&vf, VolumeKind::Share).await?;
        out.push(Workload::Share(Share {
            id: sh.id.clone(),
            project: sh.project.clone(),
            name: sh.name.clone(),
            host: s.host.clone(),
            pool: info.pool,
            size_bytes: sh.size_bytes,
            path: path(&sh.id),
            status: ShareStatus::Available,
            created_at_ms: 0,
            updated_at_ms: 0,
        }));
    }
    for db in &s.databases {
        let info = ensure(&db.volume, VolumeKind::Database).await?;
        out.push(Workload::Database(DatabaseInstance {
            id: db.id.clone(),
            project: db.project.clone(),
            name: db.name.clone(),
            host: s.host.clone(),
            status: DatabaseStatus::Active,
            volume: Volume {
                id: db.volume.id.clone(),
                size_bytes: info.size_bytes.max(db.volume.size_bytes),
                pool: info.pool,
                path: path(&db.volume.id),
            },
            flavor: Flavor {
                vcpus: db.vcpus,
                ram_mb: db.ram_mb,
            },
            datastore: db.datastore.clone(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }));
    }
    Ok(out)
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let s = args.settings()?;
    init_tracing(&s.log, s.log_json);
    check_identity(&s.data, &s.host, &s.site)?;
    let tls = match &s.tls {
        Some(paths) => {
            let m = crate::tls::TlsMaterial::load(paths)?;
            Some(AgentTls::from_pem(
                m.ca_pem().to_vec(),
                m.cert_pem().to_vec(),
                m.key_pem().to_vec(),
            ))
        }
        None => None,
    };
    let (driver, server, path) = open_driver(&s, tls.as_ref()).await?;
    let workloads = workloads(&s, &driver, &path).await?;
    let mut cfg = RuntimeConfig::new(s.host.clone(), s.site.clone(), s.data.join("agent"));
    cfg.vcpus = s.vcpus;
    cfg.ram_mb = s.ram_mb;
    cfg.data_address = server.endpoint().to_string();
    cfg.workloads = workloads;
    cfg.tls = tls;
    let discovery = Arc::new(HttpDiscovery {
        cluster: s.cluster.clone(),
        ca: s.tls.as_ref().map(|t| t.ca.clone()),
        credentials: s.credentials.clone(),
        next: std::sync::atomic::AtomicUsize::new(0),
    });
    let agent = Agent::new(cfg, driver, discovery)?;
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let sig = crate::dev::shutdown_signal().await;
            tracing::info!(signal = sig, "stopping the agent");
            shutdown.cancel();
        });
    }
    tracing::info!(
        host = %s.host,
        site = %s.site,
        driver = ?s.driver,
        data = %s.data.display(),
        data_address = %server.endpoint(),
        cluster = %s.cluster,
        "drplane agent started"
    );
    eprintln!(
        "drplane agent {} (site {}, driver {:?}) data service {}; cluster {}",
        s.host,
        s.site,
        s.driver,
        server.endpoint(),
        s.cluster
    );
    agent.run(shutdown).await?;
    server.shutdown().await;
    tracing::info!("agent stopped");
    Ok(())
}

/// The ids of the servers, shares and databases a config file declares for `host` in
/// `site`, in `project`, after the agent's own checks of the file.
#[cfg(test)]
pub(crate) fn declared_workloads(
    config: &Path,
    host: &str,
    site: &str,
    project: &str,
) -> anyhow::Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let s = AgentArgs {
        config: Some(config.to_path_buf()),
        cluster: Some("http://127.0.0.1:7001".into()),
        host: Some(host.into()),
        site: Some(site.into()),
        driver: Some(DriverKind::Fs),
        data: Some(PathBuf::from("/tmp/unused")),
        ..Default::default()
    }
    .settings()?;
    for (what, p) in s
        .servers
        .iter()
        .map(|x| ("server", &x.project))
        .chain(s.shares.iter().map(|x| ("share", &x.project)))
        .chain(s.databases.iter().map(|x| ("database", &x.project)))
    {
        if p != project {
            bail!("a {what} is in project '{p}', not '{project}'");
        }
    }
    Ok((
        s.servers.iter().map(|x| x.id.clone()).collect(),
        s.shares.iter().map(|x| x.id.clone()).collect(),
        s.databases.iter().map(|x| x.id.clone()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AgentArgs {
        AgentArgs {
            cluster: Some("http://127.0.0.1:7001".into()),
            host: Some("h1".into()),
            site: Some("s1".into()),
            driver: Some(DriverKind::Sim),
            data: Some(PathBuf::from("/tmp/a")),
            ..Default::default()
        }
    }

    #[test]
    fn settings_name_what_is_missing_and_check_values() {
        let err = AgentArgs::default().settings().expect_err("must fail");
        assert!(
            err.to_string()
                .contains("cluster, host, site, driver, data"),
            "{err}"
        );
        let s = base().settings().expect("settings");
        assert_eq!(s.listen.port(), 0);
        assert!(matches!(s.credentials, Credentials::None));
        let mut a = base();
        a.host = Some("bad host".into());
        assert!(a.settings().is_err());
        let mut a = base();
        a.user = Some("admin".into());
        assert!(a.settings().is_err(), "a user needs a password");
    }

    #[test]
    fn file_config_with_workloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            r#"
cluster = ["http://127.0.0.1:7001", "127.0.0.1:7002"]
host = "h9"
site = "s1"
driver = "sim"
data = "/tmp/x"
[sim]
latency_ms = 2
[[servers]]
id = "vm-1"
project = "demo"
name = "web"
vcpus = 2
ram_mb = 2048
status = "SHUTOFF"
disks = [{ id = "vm-1-root", size_bytes = 1024 }]
[[databases]]
id = "db-1"
project = "demo"
name = "orders"
vcpus = 1
ram_mb = 512
datastore = { type = "mysql", version = "8.0" }
volume = { id = "db-1-data", size_bytes = 4096 }
"#,
        )
        .expect("write");
        let args = AgentArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let s = args.settings().expect("settings");
        assert_eq!(s.host, "h9");
        assert_eq!(s.cluster, "http://127.0.0.1:7001,127.0.0.1:7002");
        assert_eq!(s.servers[0].status, Some(ServerStatus::Shutoff));
        assert_eq!(s.databases[0].datastore.kind, "mysql");
        std::fs::write(&path, "host = \"h\"\nbogus = 1\n").expect("write");
        let args = AgentArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(args.settings().is_err(), "unknown keys are refused");
    }

    #[test]
    fn leader_address_comes_first() {
        let status = serde_json::json!({"members": [
            {"id": 1, "raft": "a:1", "leader": false},
            {"id": 2, "raft": "b:2", "leader": true},
            {"id": 3, "raft": "c:3", "leader": false},
        ]});
        assert_eq!(raft_addresses(&status), vec!["b:2", "a:1", "c:3"]);
        assert!(raft_addresses(&serde_json::json!({})).is_empty());
    }

    #[tokio::test]
    async fn sim_workloads_are_created_and_described() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = base();
        a.data = Some(dir.path().to_path_buf());
        let mut s = a.settings().expect("settings");
        s.servers.push(ServerFile {
            id: "vm-1".into(),
            project: "demo".into(),
            name: "web".into(),
            status: None,
            vcpus: 1,
            ram_mb: 128,
            disks: vec![VolumeFile {
                id: "vm-1-root".into(),
                size_bytes: 1 << 20,
                pool: None,
            }],
        });
        let (driver, _server, path) = open_driver(&s, None).await.expect("driver");
        let w = workloads(&s, &driver, &path).await.expect("workloads");
        assert_eq!(w.len(), 1);
        match &w[0] {
            Workload::Server(srv) => {
                assert_eq!(srv.host, "h1");
                assert_eq!(srv.disks[0].path, "sim://h1/vm-1-root");
                assert_eq!(srv.disks[0].pool, "default");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Idempotent: a second start finds the same volumes.
        assert_eq!(workloads(&s, &driver, &path).await.expect("again"), w);
    }
}
