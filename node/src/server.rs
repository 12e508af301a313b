//! `drplane server`: one control-plane node. Settings come from flags, `DRPLANE_*`
//! environment variables and an optional TOML file (`--config`), in that order of
//! precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use drplane_raft::{NodeInfo, RaftNode, RaftNodeConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::control::{valid_host_port, NodeControl};

#[derive(clap::Args, Debug, Default)]
pub struct ServerArgs {
    /// TOML file with the same keys as the flags (id, site, http, raft, data, ...).
    #[arg(long, env = "DRPLANE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id, unique in the cluster (1 or more).
    #[arg(long, env = "DRPLANE_ID")]
    pub id: Option<u64>,
    /// The site (failure domain) this node runs in.
    #[arg(long, env = "DRPLANE_SITE")]
    pub site: Option<String>,
    /// HTTP API address, host:port (also what other members and clients use to reach it).
    #[arg(long, env = "DRPLANE_HTTP")]
    pub http: Option<String>,
    /// Raft gRPC address, host:port.
    #[arg(long, env = "DRPLANE_RAFT")]
    pub raft: Option<String>,
    /// Data directory (Raft log, state machine, snapshots).
    #[arg(long, env = "DRPLANE_DATA")]
    pub data: Option<PathBuf>,
    /// Build a snapshot every this many log entries.
    #[arg(long, env = "DRPLANE_SNAPSHOT_LOGS")]
    pub snapshot_logs: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long, env = "DRPLANE_KEEP_LOGS")]
    pub keep_logs: Option<u64>,
    /// Leader heartbeat interval in milliseconds.
    #[arg(long, env = "DRPLANE_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Minimum election timeout in milliseconds.
    #[arg(long, env = "DRPLANE_ELECTION_MIN_MS")]
    pub election_min_ms: Option<u64>,
    /// Maximum election timeout in milliseconds.
    #[arg(long, env = "DRPLANE_ELECTION_MAX_MS")]
    pub election_max_ms: Option<u64>,
    /// Deadline of a client request through the cluster, in milliseconds.
    #[arg(long, env = "DRPLANE_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info,drplane_raft=debug`.
    #[arg(long, env = "DRPLANE_LOG")]
    pub log: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "DRPLANE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// TLS: this node's PEM certificate (chain). With --tls-key and --tls-ca, the HTTP API
    /// serves HTTPS and node-to-node RPC uses mutual TLS; give all three or none.
    #[arg(long, env = "DRPLANE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the PEM private key of --tls-cert.
    #[arg(long, env = "DRPLANE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the PEM certificate of the cluster CA that signed every node's certificate.
    #[arg(long, env = "DRPLANE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Scheduler: a task's lease in milliseconds (renewed while its agent is alive).
    #[arg(long, env = "DRPLANE_TASK_LEASE_MS")]
    pub task_lease_ms: Option<u64>,
    /// Scheduler: a host whose agent is silent this many milliseconds is marked offline.
    #[arg(long, env = "DRPLANE_HOST_OFFLINE_AFTER_MS")]
    pub host_offline_after_ms: Option<u64>,
}

/// The TOML file's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    site: Option<String>,
    http: Option<String>,
    raft: Option<String>,
    data: Option<PathBuf>,
    snapshot_logs: Option<u64>,
    keep_logs: Option<u64>,
    heartbeat_ms: Option<u64>,
    election_min_ms: Option<u64>,
    election_max_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    log: Option<String>,
    log_format: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    task_lease_ms: Option<u64>,
    host_offline_after_ms: Option<u64>,
}

/// Settings after merging flags, environment and file.
#[derive(Debug, Clone)]
pub struct Settings {
    pub raft: RaftNodeConfig,
    pub http_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub log: String,
    pub log_json: bool,
    /// TLS files, when TLS is on (all three given).
    pub tls: Option<crate::tls::TlsPaths>,
    /// The leader's scheduler.
    pub scheduler: crate::scheduler::SchedulerConfig,
}

/// Written in the data directory on first start; a later start with another id or site is
/// refused, so a data directory is never served under the wrong identity.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Identity {
    id: u64,
    site: String,
}

impl ServerArgs {
    pub fn settings(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let id = self.id.or(file.id);
        let site = self.site.or(file.site);
        let http = self.http.or(file.http);
        let raft = self.raft.or(file.raft);
        let data = self.data.or(file.data);
        let mut missing = Vec::new();
        if id.is_none() {
            missing.push("id");
        }
        if site.is_none() {
            missing.push("site");
        }
        if http.is_none() {
            missing.push("http");
        }
        if raft.is_none() {
            missing.push("raft");
        }
        if data.is_none() {
            missing.push("data");
        }
        let (Some(id), Some(site), Some(http), Some(raft), Some(data)) =
            (id, site, http, raft, data)
        else {
            bail!(
                "missing settings: {} (give them as --flags, DRPLANE_* variables or keys in --config)",
                missing.join(", ")
            );
        };
        if id == 0 {
            bail!("id must be 1 or more");
        }
        drplane_statemachine::command::validate_site_name(&site)
            .map_err(|e| anyhow::anyhow!("site: {e}"))?;
        let http_addr = parse_addr("http", &http)?;
        let raft_addr = parse_addr("raft", &raft)?;
        if http_addr == raft_addr {
            bail!("http and raft addresses must differ (both are {http})");
        }
        let mut cfg = RaftNodeConfig::new(id, NodeInfo { site, http, raft }, data);
        if let Some(v) = self.snapshot_logs.or(file.snapshot_logs) {
            cfg.snapshot_logs = v.max(1);
        }
        if let Some(v) = self.keep_logs.or(file.keep_logs) {
            cfg.keep_logs = v;
        }
        if let Some(v) = self.heartbeat_ms.or(file.heartbeat_ms) {
            cfg.heartbeat_ms = v;
        }
        if let Some(v) = self.election_min_ms.or(file.election_min_ms) {
            cfg.election_timeout_min_ms = v;
        }
        if let Some(v) = self.election_max_ms.or(file.election_max_ms) {
            cfg.election_timeout_max_ms = v;
        }
        if let Some(v) = self.request_timeout_ms.or(file.request_timeout_ms) {
            cfg.request_timeout = Duration::from_millis(v.max(100));
        }
        if cfg.heartbeat_ms == 0
            || cfg.election_timeout_min_ms <= cfg.heartbeat_ms
            || cfg.election_timeout_max_ms <= cfg.election_timeout_min_ms
        {
            bail!(
                "timeouts must satisfy 0 < heartbeat ({}) < election min ({}) < election max ({})",
                cfg.heartbeat_ms,
                cfg.election_timeout_min_ms,
                cfg.election_timeout_max_ms
            );
        }
        let log_format = self
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            bail!("log format must be text or json, not '{log_format}'");
        }
        let mut scheduler = crate::scheduler::SchedulerConfig::default();
        if let Some(v) = self.task_lease_ms.or(file.task_lease_ms) {
            if v < 1000 {
                bail!("task lease must be at least 1000 ms (got {v})");
            }
            scheduler.lease = Duration::from_millis(v);
        }
        if let Some(v) = self.host_offline_after_ms.or(file.host_offline_after_ms) {
            if v < 2000 {
                bail!("host offline delay must be at least 2000 ms (got {v})");
            }
            scheduler.offline_after = Duration::from_millis(v);
        }
        let tls = crate::tls::TlsPaths::from_parts(
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.tls_ca.or(file.tls_ca),
        )?;
        Ok(Settings {
            tls,
            scheduler,
            raft: cfg,
            http_addr,
            raft_addr,
            log: self
                .log
                .or(file.log)
                .unwrap_or_else(|| "info,openraft=warn".into()),
            log_json: log_format == "json",
        })
    }
}

fn parse_addr(what: &str, addr: &str) -> anyhow::Result<SocketAddr> {
    if !valid_host_port(addr) {
        bail!("{what} address '{addr}' is not host:port");
    }
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {what} address '{addr}'"))?
        .next()
        .with_context(|| format!("{what} address '{addr}' resolves to nothing"))
}

fn check_identity(data: &Path, id: u64, site: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating data directory {}", data.display()))?;
    let path = data.join("node.json");
    let me = Identity {
        id,
        site: site.to_string(),
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let stored: Identity = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            if stored != me {
                bail!(
                    "data directory {} belongs to node {} in site '{}', not node {} in site '{}'",
                    data.display(),
                    stored.id,
                    stored.site,
                    id,
                    site
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = serde_json::to_vec_pretty(&me)?;
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Identity settings of the HTTP API. The first admin's password comes from the
/// environment only (`DRPLANE_ADMIN_PASSWORD`), never from a flag or a config key, which
/// would show in `ps` and in files; without it, `cluster init` generates one and returns it
/// once.
fn auth_options(https: bool) -> drplane_api::AuthOptions {
    let admin_password = std::env::var("DRPLANE_ADMIN_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty());
    drplane_api::AuthOptions {
        admin_password,
        public_scheme: if https { "https" } else { "http" }.into(),
        ..Default::default()
    }
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    init_tracing(&settings.log, settings.log_json);
    // Load and check the TLS files before anything binds or opens (a node never starts
    // half-configured or with a broken certificate).
    let tls = match &settings.tls {
        Some(paths) => Some(crate::tls::TlsMaterial::load(paths)?),
        None => None,
    };
    let mut cfg = settings.raft.clone();
    cfg.tls = tls.as_ref().map(|t| t.grpc_client_config());
    check_identity(&cfg.data_dir, cfg.id, &cfg.info.site)?;

    // Bind both listeners first so a port in use is a clear error before anything starts.
    let raft_listener = tokio::net::TcpListener::bind(settings.raft_addr)
        .await
        .with_context(|| format!("binding raft address {}", settings.raft_addr))?;
    let http_listener = tokio::net::TcpListener::bind(settings.http_addr)
        .await
        .with_context(|| format!("binding http address {}", settings.http_addr))?;

    let node = RaftNode::start(cfg.clone()).await?;
    // Runs only while this node leads; agents connect on the raft address.
    let scheduler = crate::scheduler::Scheduler::start(node.clone(), settings.scheduler.clone());
    let (stop_tx, stop_rx) = watch::channel(false);

    let grpc = {
        let node = node.clone();
        let mut stop = stop_rx.clone();
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(drplane_raft::service::raft_service(node))
            .add_service(crate::agent_service::agent_service(scheduler.clone()));
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match &tls {
            Some(t) => {
                let incoming = crate::tls::grpc_incoming(raft_listener, t.grpc_server_config()?);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
            }
            None => {
                // Nagle off on accepted connections too (the builder's tcp_nodelay only
                // covers sockets tonic binds itself): a Raft reply must not wait for an ACK.
                let incoming = tonic::transport::server::TcpIncoming::from_listener(
                    raft_listener,
                    true,
                    Some(Duration::from_secs(30)),
                )
                .map_err(|e| anyhow::anyhow!("raft listener: {e}"))?;
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
            }
        }
    };

    let control = Arc::new(NodeControl {
        node: node.clone(),
        scheduler: Some(scheduler.clone()),
    });
    let router = drplane_api::router_with(control, auth_options(tls.is_some()));
    let http = {
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match &tls {
            Some(t) => {
                let listener = crate::tls::TlsListener::new(http_listener, t.http_server_config()?)
                    .context("https listener")?;
                tokio::spawn(async move {
                    axum::serve(listener, router)
                        .with_graceful_shutdown(shutdown)
                        .await
                })
            }
            None => tokio::spawn(async move {
                use axum::serve::ListenerExt;
                // Nagle off: a response must not wait for the client's delayed ACK.
                let listener = http_listener.tap_io(|tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "set TCP_NODELAY");
                    }
                });
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }),
        }
    };

    tracing::info!(
        id = cfg.id,
        site = %cfg.info.site,
        http = %settings.http_addr,
        raft = %settings.raft_addr,
        data = %cfg.data_dir.display(),
        "drplane node started"
    );
    eprintln!(
        "drplane node {} (site {}) listening: {}={} raft={}{}",
        cfg.id,
        cfg.info.site,
        if tls.is_some() { "https" } else { "http" },
        settings.http_addr,
        settings.raft_addr,
        if tls.is_some() { " (mutual TLS)" } else { "" }
    );

    // A fatal storage error (e.g. a full disk) stops openraft's core for good: exit with
    // an error instead of serving as a node that looks alive but cannot catch up, so a
    // supervisor restarts it (after the disk has room again, it recovers from its log).
    let core_failed = tokio::select! {
        _ = shutdown_signal() => false,
        _ = node.core_stopped() => true,
    };
    if core_failed {
        tracing::error!("the raft core stopped after a fatal storage error: exiting");
        eprintln!(
            "drplane node {}: the raft core stopped after a fatal storage error (is the disk \
             full or failing? see the log above); exiting so it can be restarted",
            cfg.id
        );
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    scheduler.shutdown();
    // Give in-flight HTTP requests a moment; never hang on shutdown.
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    node.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), grpc).await;
    tracing::info!("stopped");
    if core_failed {
        anyhow::bail!("the raft core stopped after a fatal storage error");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ServerArgs {
        ServerArgs {
            id: Some(1),
            site: Some("a".into()),
            http: Some("127.0.0.1:7001".into()),
            raft: Some("127.0.0.1:7101".into()),
            data: Some(PathBuf::from("/tmp/x")),
            ..Default::default()
        }
    }

    #[test]
    fn settings_require_every_key_and_name_the_missing_ones() {
        let err = ServerArgs::default().settings().expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("id, site, http, raft, data"), "{msg}");
        assert!(base().settings().is_ok());
    }

    #[test]
    fn settings_refuse_bad_values() {
        let mut a = base();
        a.http = Some("nonsense".into());
        assert!(a.settings().is_err());
        let mut a = base();
        a.raft = a.http.clone();
        assert!(a.settings().is_err());
        let mut a = base();
        a.site = Some("bad site".into());
        assert!(a.settings().is_err());
        let mut a = base();
        a.election_min_ms = Some(10);
        assert!(a.settings().is_err());
    }

    #[test]
    fn file_config_fills_what_flags_leave_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "id = 3\nsite = \"b\"\nhttp = \"127.0.0.1:7003\"\nraft = \"127.0.0.1:7103\"\ndata = \"/tmp/n3\"\nsnapshot_logs = 7\n",
        )
        .expect("write");
        let args = ServerArgs {
            config: Some(path.clone()),
            site: Some("override".into()),
            ..Default::default()
        };
        let s = args.settings().expect("settings");
        assert_eq!(s.raft.id, 3);
        assert_eq!(s.raft.info.site, "override", "flags win over the file");
        assert_eq!(s.raft.snapshot_logs, 7);
        std::fs::write(&path, "id = 3\nbogus = 1\n").expect("write");
        let args = ServerArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(args.settings().is_err(), "unknown keys are refused");
    }

    #[test]
    fn tls_settings_are_all_or_nothing() {
        let mut a = base();
        a.tls_cert = Some("node.pem".into());
        let err = a.settings().expect_err("half-configured");
        assert!(err.to_string().contains("half-configured"), "{err}");
        assert!(base().settings().expect("plain").tls.is_none());
        let mut a = base();
        a.tls_cert = Some("node.pem".into());
        a.tls_key = Some("node-key.pem".into());
        a.tls_ca = Some("ca.pem".into());
        let tls = a.settings().expect("tls").tls.expect("tls on");
        assert_eq!(tls.ca, PathBuf::from("ca.pem"));

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_ca = \"ca.pem\"\n",
        )
        .expect("write");
        let mut a = base();
        a.config = Some(path.clone());
        let tls = a.settings().expect("tls from file").tls.expect("tls on");
        assert_eq!(tls.key, PathBuf::from("k.pem"));
        std::fs::write(&path, "tls_ca = \"ca.pem\"\n").expect("write");
        let mut a = base();
        a.config = Some(path);
        a.tls_cert = Some("node.pem".into());
        let err = a.settings().expect_err("flags and file still half");
        assert!(err.to_string().contains("tls-key missing"), "{err}");
    }

    #[test]
    fn identity_is_pinned_to_the_data_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        check_identity(dir.path(), 1, "a").expect("first start");
        check_identity(dir.path(), 1, "a").expect("same identity");
        let err = check_identity(dir.path(), 2, "a").expect_err("other id");
        assert!(err.to_string().contains("belongs to node 1"), "{err}");
    }
}
