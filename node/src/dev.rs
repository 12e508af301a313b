//! `drplane dev`: a local three-node cluster in one command, until Ctrl-C.
//!
//! Node i (1..=3) runs in site `site-i` with HTTP on 127.0.0.1:(base+i), Raft on
//! 127.0.0.1:(base+100+i) and data in `<dir>/node-i`; its stdout and stderr are appended
//! to `<dir>/node-i.log`. On first start the cluster is initialized on node 1 and nodes 2
//! and 3 are added as learners and promoted; run again on the same directory, the nodes
//! resume their data and nothing is re-initialized.
//!
//! With `--tls` a development CA and one certificate per node are made under `<dir>/tls`
//! (kept and reused on a rerun), every node serves HTTPS and mutual TLS between nodes, and
//! dev itself talks to them over https trusting only that CA (`<dir>/tls/ca.pem`, also what
//! to give `drplane --ca` and `curl --cacert`).
//!
//! Without `--tls`, dev also runs two `fs` agents (`drplane agent`): agent i (1..=2) is
//! host `host-i` in site `site-i`, with data in `<dir>/agent-i`, its output in
//! `<dir>/agent-i.log`, and a config file `<dir>/agent-i.toml` (rewritten at every start)
//! declaring a demo inventory with fixed ids, so a rerun upserts the same records and
//! finds the volumes already made. They find the leader with the admin's password (they
//! log in again at every discovery), and `ready` waits until both hosts are online. The
//! agent cannot talk TLS to the cluster yet, so `--tls` starts none.
//!
//! The children (nodes and agents) run in their own process group, so a Ctrl-C in the
//! terminal reaches only this process, which then stops them in order, agents first
//! (SIGTERM, up to 10 s, then SIGKILL): a child exiting on its own is then always
//! unexpected, never a race with our shutdown.
//!
//! [`LocalCluster`] is also what `drplane bench failover` uses to run its own cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::cli::describe_transport_error;

/// Deadline for a started node to answer `/livez`.
const LIVEZ_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for forming the cluster (init, add, promote).
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for every node to answer `/readyz` with 200.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long stopped children get between SIGTERM and SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);
/// Written to a node's log before each start, so a crash report shows only this run.
const LOG_MARKER: &str = "==== drplane dev: starting";
/// Deadline for the dev agents' hosts to show online.
const AGENTS_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Directory for the nodes' data and logs.
    #[arg(long, default_value = "./.drplane-dev")]
    pub dir: PathBuf,
    /// Node i listens on HTTP port base+i and Raft port base+100+i.
    #[arg(long, default_value_t = 7000)]
    pub base_port: u16,
    /// Serve HTTPS with mutual TLS between nodes, from a dev CA made in <dir>/tls.
    #[arg(long)]
    pub tls: bool,
}

/// One node of a local cluster: identity, addresses, files.
#[derive(Debug, Clone)]
pub(crate) struct NodeSpec {
    pub id: u64,
    pub site: String,
    /// HTTP address, `host:port`.
    pub http: String,
    /// Raft gRPC address, `host:port`.
    pub raft: String,
    pub data: PathBuf,
    pub log: PathBuf,
    /// The node's `--tls-cert/--tls-key/--tls-ca`; None for plain HTTP.
    pub tls: Option<crate::tls::TlsPaths>,
}

impl NodeSpec {
    /// Base URL of the node's HTTP API.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.http)
    }
}

/// Makes (or reuses) the dev PKI in `tls_dir` for `node-1`… and gives each spec its files.
pub(crate) fn enable_dev_tls(
    specs: &mut [NodeSpec],
    agents: &mut [AgentSpec],
    tls_dir: &Path,
) -> anyhow::Result<crate::tls::DevPki> {
    let mut names: Vec<String> = specs.iter().map(|s| format!("node-{}", s.id)).collect();
    names.extend(agents.iter().map(|a| a.host.clone()));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = crate::tls::generate_dev_pki(tls_dir, &names, &["127.0.0.1", "localhost"])
        .with_context(|| format!("making the dev TLS files in {}", tls_dir.display()))?;
    let mut issued = pki.nodes.iter();
    for (spec, paths) in specs.iter_mut().zip(issued.by_ref()) {
        spec.tls = Some(paths.clone());
    }
    for (agent, paths) in agents.iter_mut().zip(issued) {
        agent.tls = Some(paths.clone());
    }
    Ok(pki)
}

/// The three nodes of a local cluster on 127.0.0.1.
pub(crate) fn local_specs(dir: &Path, base_port: u16) -> anyhow::Result<Vec<NodeSpec>> {
    if u32::from(base_port) + 103 > u32::from(u16::MAX) {
        bail!("--base-port {base_port} is too high: ports up to base+103 are used");
    }
    if base_port < 1024 {
        bail!("--base-port {base_port} is too low: use 1024 or more");
    }
    Ok((1..=3u16)
        .map(|i| NodeSpec {
            id: u64::from(i),
            site: format!("site-{i}"),
            http: format!("127.0.0.1:{}", base_port + i),
            raft: format!("127.0.0.1:{}", base_port + 100 + i),
            data: dir.join(format!("node-{i}")),
            log: dir.join(format!("node-{i}.log")),
            tls: None,
        })
        .collect())
}

/// A node and, while it runs, its process.
pub(crate) struct LocalNode {
    pub spec: NodeSpec,
    child: Option<Child>,
}

/// How [`LocalCluster::form`] found the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Formation {
    /// Initialized now.
    Created,
    /// The nodes already formed a cluster (data from an earlier run); completed if needed.
    Resumed,
}

/// Server processes on this machine, started from this very binary.
pub(crate) struct LocalCluster {
    exe: PathBuf,
    extra_args: Vec<String>,
    pub nodes: Vec<LocalNode>,
    /// Agents started with the nodes (`drplane dev` only), stopped before them.
    pub agents: Vec<LocalAgent>,
    http: reqwest::Client,
    /// Given to every node as `DRPLANE_ADMIN_PASSWORD`: the password of user `admin`.
    admin_password: String,
    /// The admin's token once [`Self::form`] logged in; sent with every request after.
    token: Option<String>,
    /// Ask the first init for the `demo` project and user.
    pub demo: bool,
    /// The answer of the init this run made, if it made one (generated passwords).
    pub init_answer: Option<Value>,
}

impl LocalCluster {
    /// `extra_args` are appended to every `drplane server` command line.
    pub fn new(specs: Vec<NodeSpec>, extra_args: Vec<String>) -> anyhow::Result<LocalCluster> {
        let exe = std::env::current_exe().context("cannot find the path of this drplane binary")?;
        // A TLS cluster: trust its CA, and only it.
        let builder = match specs.first().and_then(|s| s.tls.as_ref()) {
            Some(tls) => crate::cli::client_builder(Some(&tls.ca))?,
            None => reqwest::Client::builder(),
        };
        let http = builder
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(LocalCluster {
            exe,
            extra_args,
            nodes: specs
                .into_iter()
                .map(|spec| LocalNode { spec, child: None })
                .collect(),
            agents: Vec::new(),
            http,
            admin_password: crate::dev_identity::random_password(),
            token: None,
            demo: false,
            init_answer: None,
        })
    }

    /// The admin password the nodes start with (a random one unless set).
    pub fn set_admin_password(&mut self, password: String) {
        self.admin_password = password;
    }

    /// The admin's token, after [`Self::form`].
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Logs in as `admin` on the first node (`POST /v3/auth/tokens`), retrying on 503 and
    /// transport errors until `deadline`.
    async fn login(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let url = format!("{}/v3/auth/tokens?nocatalog", self.nodes[0].spec.url());
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"id": "default"}, "password": self.admin_password}}},
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}
        }});
        loop {
            self.check_alive()?;
            let last = match self.http.post(&url).json(&body).send().await {
                Ok(resp) if resp.status().is_success() => {
                    let token = resp
                        .headers()
                        .get("x-subject-token")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("POST {url}: no X-Subject-Token in the answer"))?;
                    self.token = Some(token);
                    return Ok(());
                }
                Ok(resp) if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    resp.status().to_string()
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    bail!("logging in as admin at {url}: {status}: {text}");
                }
                Err(e) => describe_transport_error(&e),
            };
            if Instant::now() >= deadline {
                bail!("POST {url}: still failing at the deadline: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Every HTTP and Raft port is free on 127.0.0.1, or a clear error.
    pub fn check_ports_free(&self) -> anyhow::Result<()> {
        for n in &self.nodes {
            for (what, addr) in [("HTTP", &n.spec.http), ("Raft", &n.spec.raft)] {
                if let Err(e) = std::net::TcpListener::bind(addr.as_str()) {
                    bail!(
                        "{what} address {addr} of node {} is not available ({e}); is another \
                         drplane dev or server running? Stop it, or choose other ports with \
                         --base-port",
                        n.spec.id
                    );
                }
            }
        }
        Ok(())
    }

    /// Starts node `i` (an index into `nodes`) with its usual arguments.
    pub async fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(i)
            .ok_or_else(|| anyhow!("no node at index {i}"))?;
        let spec = &node.spec;
        let (stdout, log) = open_child_log(&spec.log, &format!("node {}", spec.id))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("server")
            .arg("--id")
            .arg(spec.id.to_string())
            .arg("--site")
            .arg(&spec.site)
            .arg("--http")
            .arg(&spec.http)
            .arg("--raft")
            .arg(&spec.raft)
            .arg("--data")
            .arg(&spec.data)
            .args(spec.tls.iter().flat_map(|t| {
                [
                    std::ffi::OsStr::new("--tls-cert"),
                    t.cert.as_os_str(),
                    std::ffi::OsStr::new("--tls-key"),
                    t.key.as_os_str(),
                    std::ffi::OsStr::new("--tls-ca"),
                    t.ca.as_os_str(),
                ]
            }))
            .args(&self.extra_args)
            // The logs go to a file: no ANSI colour codes in it.
            .env("NO_COLOR", "1")
            .env("DRPLANE_ADMIN_PASSWORD", &self.admin_password)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(log)
            // Our own process group: a terminal's Ctrl-C reaches only us; we stop them.
            .process_group(0)
            // Backstop if we unwind without stopping them.
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {} server for node {}",
                self.exe.display(),
                spec.id
            )
        })?;
        node.child = Some(child);
        Ok(())
    }

    /// Fails, with the end of its log, if a node that should run has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            let Some(child) = n.child.as_mut() else {
                continue;
            };
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    n.child = None;
                    bail!(
                        "node {} exited unexpectedly ({status}); last lines of {}:\n{}",
                        n.spec.id,
                        n.spec.log.display(),
                        log_tail(&n.spec.log, 25)
                    );
                }
                Err(e) => bail!("cannot check on node {}: {e}", n.spec.id),
            }
        }
        for a in &mut self.agents {
            let Some(child) = a.child.as_mut() else {
                continue;
            };
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    a.child = None;
                    bail!(
                        "agent {} ({}) exited unexpectedly ({status}); last lines of {}:\n{}",
                        a.spec.id,
                        a.spec.host,
                        a.spec.log.display(),
                        log_tail(&a.spec.log, 25)
                    );
                }
                Err(e) => bail!("cannot check on agent {}: {e}", a.spec.id),
            }
        }
        Ok(())
    }

    /// Waits until node `i` answers `/livez`.
    pub async fn wait_livez(&mut self, i: usize) -> anyhow::Result<()> {
        let url = format!("{}/livez", self.nodes[i].spec.url());
        let deadline = Instant::now() + LIVEZ_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Ok(resp) = self.http.get(&url).send().await {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {} did not answer {url} within {} s; see {}",
                    self.nodes[i].spec.id,
                    LIVEZ_TIMEOUT.as_secs(),
                    self.nodes[i].spec.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks the ports, starts every node and waits for each `/livez`.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        self.check_ports_free()?;
        for i in 0..self.nodes.len() {
            self.spawn(i).await?;
        }
        for i in 0..self.nodes.len() {
            self.wait_livez(i).await?;
        }
        Ok(())
    }

    /// Waits until every running node answers `/readyz` with 200.
    pub async fn wait_ready_all(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.nodes.len() {
            let url = format!("{}/readyz", self.nodes[i].spec.url());
            loop {
                self.check_alive()?;
                let last = match self.http.get(&url).send().await {
                    Ok(resp) if resp.status().is_success() => break,
                    Ok(resp) => {
                        let status = resp.status();
                        let body: Value = resp.json().await.unwrap_or(Value::Null);
                        match body.get("reason").and_then(Value::as_str) {
                            Some(reason) => format!("{status}: {reason}"),
                            None => status.to_string(),
                        }
                    }
                    Err(e) => describe_transport_error(&e),
                };
                if Instant::now() >= deadline {
                    bail!(
                        "node {} is not ready after {} s ({last}); see {}",
                        self.nodes[i].spec.id,
                        timeout.as_secs(),
                        self.nodes[i].spec.log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// `GET /drplane/v1/cluster` on node `i`.
    pub async fn cluster_status(&self, i: usize) -> anyhow::Result<Value> {
        let url = format!("{}/drplane/v1/cluster", self.nodes[i].spec.url());
        let mut rb = self.http.get(&url);
        if let Some(t) = &self.token {
            rb = rb.header("X-Auth-Token", t);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| anyhow!("GET {url}: {}", describe_transport_error(&e)))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .with_context(|| format!("GET {url}: the answer is not JSON"))?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {body}");
        }
        Ok(body)
    }

    /// `method url` with an optional JSON body, retried on 503 and transport errors until
    /// `deadline`; any other error answer fails at once.
    async fn call_retrying(
        &mut self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
        deadline: Instant,
    ) -> anyhow::Result<Value> {
        loop {
            self.check_alive()?;
            let mut rb = self.http.request(method.clone(), url);
            if let Some(b) = &body {
                rb = rb.json(b);
            }
            if let Some(t) = &self.token {
                rb = rb.header("X-Auth-Token", t);
            }
            let last = match rb.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let answer: Value = resp.json().await.unwrap_or(Value::Null);
                    if status.is_success() {
                        return Ok(answer);
                    }
                    let message = answer
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| answer.to_string());
                    if status != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                        bail!("{method} {url}: {status}: {message}");
                    }
                    format!("{status}: {message}")
                }
                Err(e) => describe_transport_error(&e),
            };
            if Instant::now() >= deadline {
                bail!("{method} {url}: still failing at the deadline: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Makes the nodes one cluster of three voters: init on the first node unless it
    /// already belongs to a cluster, then add and promote each other node that is not a
    /// voter yet. Every step is idempotent, so an interrupted earlier run is completed.
    pub async fn form(&mut self) -> anyhow::Result<Formation> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        let first = self.nodes[0].spec.url();
        // A node whose store has no user yet answers this without credentials; one of a
        // bootstrapped cluster answers 401 (we then log in below).
        self.token = None;
        let status = match self
            .call_retrying(
                reqwest::Method::GET,
                &format!("{first}/drplane/v1/cluster"),
                None,
                deadline,
            )
            .await
        {
            Ok(s) => Some(s),
            Err(e) if e.to_string().contains("401") => None,
            Err(e) => return Err(e),
        };
        let init_body = self.demo.then(|| serde_json::json!({"demo": true}));
        let formation = match status {
            Some(status) if members_of(&status).is_empty() => {
                let answer = self
                    .call_retrying(
                        reqwest::Method::POST,
                        &format!("{first}/drplane/v1/cluster/init"),
                        init_body,
                        deadline,
                    )
                    .await?;
                self.init_answer = Some(answer);
                Formation::Created
            }
            Some(_) => {
                // A cluster from before identity existed: init completes its bootstrap.
                if let Ok(answer) = self
                    .call_retrying(
                        reqwest::Method::POST,
                        &format!("{first}/drplane/v1/cluster/init"),
                        init_body,
                        deadline,
                    )
                    .await
                {
                    self.init_answer = Some(answer);
                }
                Formation::Resumed
            }
            None => Formation::Resumed,
        };
        self.login(deadline).await?;
        for i in 1..self.nodes.len() {
            let status = self
                .call_retrying(
                    reqwest::Method::GET,
                    &format!("{first}/drplane/v1/cluster"),
                    None,
                    deadline,
                )
                .await?;
            let spec = self.nodes[i].spec.clone();
            let member = members_of(&status)
                .into_iter()
                .find(|m| m.get("id").and_then(Value::as_u64) == Some(spec.id));
            if let Some(m) = &member {
                let http = m.get("http").and_then(Value::as_str).unwrap_or("");
                let raft = m.get("raft").and_then(Value::as_str).unwrap_or("");
                if http != spec.http || raft != spec.raft {
                    bail!(
                        "node {} is a member with addresses http={http} raft={raft}, not {} and \
                         {}: the data was made with another --base-port; use that one, or \
                         another --dir",
                        spec.id,
                        spec.http,
                        spec.raft
                    );
                }
            }
            if member.is_none() {
                let body = serde_json::json!({
                    "id": spec.id, "site": spec.site, "http": spec.http, "raft": spec.raft
                });
                self.call_retrying(
                    reqwest::Method::POST,
                    &format!("{first}/drplane/v1/cluster/members"),
                    Some(body),
                    deadline,
                )
                .await?;
            }
            let is_voter = member
                .as_ref()
                .and_then(|m| m.get("role"))
                .and_then(Value::as_str)
                == Some("voter");
            if !is_voter {
                self.call_retrying(
                    reqwest::Method::POST,
                    &format!(
                        "{first}/drplane/v1/cluster/members/{}/promote?force=false",
                        spec.id
                    ),
                    None,
                    deadline,
                )
                .await?;
            }
        }
        Ok(formation)
    }

    /// The leader and term every running node agrees on, with the leader itself in state
    /// `Leader`; `None` while any running node disagrees or does not answer. One node's
    /// word is not enough: a restarted ex-leader can report its old leadership until the
    /// new leader reaches it.
    pub async fn agreed_leader(&self) -> Option<(u64, u64)> {
        let mut views = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                continue;
            }
            let status = self.cluster_status(i).await.ok()?;
            views.push((
                self.nodes[i].spec.id,
                status.get("leader_id").and_then(Value::as_u64),
                status.get("term").and_then(Value::as_u64),
                status
                    .get("state")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            ));
        }
        let (_, leader, term, _) = views.first()?.clone();
        let (leader, term) = (leader?, term?);
        let agree = views
            .iter()
            .all(|(_, l, t, _)| *l == Some(leader) && *t == Some(term));
        let leader_says_so = views
            .iter()
            .any(|(id, _, _, state)| *id == leader && state == "Leader");
        (agree && leader_says_so).then_some((leader, term))
    }

    /// Waits for [`Self::agreed_leader`].
    pub async fn wait_agreed_leader(&self, timeout: Duration) -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.agreed_leader().await {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the running nodes do not agree on a leader after {} s",
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Index into `nodes` of the node with this id.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.spec.id == id)
    }

    /// SIGKILLs node `i` and reaps it. Returns the instant just before the signal was sent.
    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes.get(i)?.child.as_ref()?.id()
    }

    pub async fn kill_hard(&mut self, i: usize) -> anyhow::Result<Instant> {
        let id = self.nodes[i].spec.id;
        let mut child = self.nodes[i]
            .child
            .take()
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        let at = Instant::now();
        child
            .start_kill()
            .with_context(|| format!("cannot kill node {id}"))?;
        child
            .wait()
            .await
            .with_context(|| format!("waiting for killed node {id}"))?;
        Ok(at)
    }

    /// Stops every running agent, then every running node: SIGTERM, up to `grace`, then
    /// SIGKILL. Never fails; says on stderr what it could not do.
    pub async fn stop_all(&mut self, grace: Duration) {
        let agents = self
            .agents
            .iter_mut()
            .filter_map(|a| {
                let child = a.child.take()?;
                Some((
                    format!("agent {} ({})", a.spec.id, a.spec.host),
                    child,
                    a.spec.log.clone(),
                ))
            })
            .collect();
        stop_children(agents, grace).await;
        let nodes = self
            .nodes
            .iter_mut()
            .filter_map(|n| {
                let child = n.child.take()?;
                Some((format!("node {}", n.spec.id), child, n.spec.log.clone()))
            })
            .collect();
        stop_children(nodes, grace).await;
    }

    /// Makes the sites the agents are in, if missing (a host's site must exist).
    async fn ensure_agent_sites(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let first = self.nodes[0].spec.url();
        let listed = self
            .call_retrying(
                reqwest::Method::GET,
                &format!("{first}/drplane/v1/sites"),
                None,
                deadline,
            )
            .await?;
        let have: Vec<String> = listed
            .get("sites")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut wanted: Vec<String> = self.agents.iter().map(|a| a.spec.site.clone()).collect();
        wanted.dedup();
        for site in wanted.into_iter().filter(|s| !have.contains(s)) {
            self.call_retrying(
                reqwest::Method::POST,
                &format!("{first}/drplane/v1/sites"),
                Some(serde_json::json!({"name": site, "description": "drplane dev data site"})),
                deadline,
            )
            .await?;
        }
        Ok(())
    }

    /// Writes agent `i`'s config file and starts it against every node.
    pub async fn spawn_agent(&mut self, i: usize, project: &str) -> anyhow::Result<()> {
        let cluster: Vec<String> = self.nodes.iter().map(|n| n.spec.url()).collect();
        let agent = self
            .agents
            .get_mut(i)
            .ok_or_else(|| anyhow!("no agent at index {i}"))?;
        let spec = &agent.spec;
        std::fs::create_dir_all(&spec.data)
            .with_context(|| format!("creating directory {}", spec.data.display()))?;
        std::fs::write(&spec.config, agent_config_toml(spec, project))
            .with_context(|| format!("writing {}", spec.config.display()))?;
        let (stdout, log) = open_child_log(&spec.log, &format!("agent {}", spec.id))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("agent")
            .arg("--config")
            .arg(&spec.config)
            .arg("--cluster")
            .arg(cluster.join(","))
            .arg("--host")
            .arg(&spec.host)
            .arg("--site")
            .arg(&spec.site)
            .arg("--driver")
            .arg("fs")
            .arg("--data")
            .arg(&spec.data)
            .arg("--listen")
            .arg("127.0.0.1:0");
        if let Some(t) = &spec.tls {
            cmd.arg("--tls-cert")
                .arg(&t.cert)
                .arg("--tls-key")
                .arg(&t.key)
                .arg("--tls-ca")
                .arg(&t.ca);
        }
        cmd.env("NO_COLOR", "1")
            // A password, not a token: the agent logs in again at every discovery, so a
            // dev cluster left running for days never hands it an expired token.
            .env_remove("DRPLANE_TOKEN")
            .env("DRPLANE_USER", "admin")
            .env("DRPLANE_PASSWORD", &self.admin_password)
            .env("DRPLANE_PROJECT", "admin")
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {} agent for host {}",
                self.exe.display(),
                spec.host
            )
        })?;
        agent.child = Some(child);
        Ok(())
    }

    /// Waits until `GET /drplane/v1/hosts` shows every agent's host online.
    async fn wait_agents_online(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/drplane/v1/hosts", self.nodes[0].spec.url());
        let names: Vec<String> = self.agents.iter().map(|a| a.spec.host.clone()).collect();
        loop {
            let doc = self
                .call_retrying(reqwest::Method::GET, &url, None, deadline)
                .await?;
            let missing = hosts_not_online(&doc, &names);
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "host(s) {} not online after {} s; see the agents' logs in {}",
                    missing.join(", "),
                    timeout.as_secs(),
                    self.agents[0]
                        .spec
                        .log
                        .parent()
                        .unwrap_or(Path::new("."))
                        .display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Opens (appending) a child's log file, marks this start in it, and gives it twice: for
/// stdout and stderr.
fn open_child_log(path: &Path, what: &str) -> anyhow::Result<(std::fs::File, std::fs::File)> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating directory {}", parent.display()))?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))?;
    use std::io::Write as _;
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    writeln!(log, "{LOG_MARKER} {what} at unix_ms={unix_ms} ====")
        .with_context(|| format!("writing log file {}", path.display()))?;
    let stdout = log
        .try_clone()
        .with_context(|| format!("opening log file {}", path.display()))?;
    Ok((stdout, log))
}

/// SIGTERMs every child, waits up to `grace` for them all, then SIGKILLs the rest.
async fn stop_children(mut children: Vec<(String, Child, PathBuf)>, grace: Duration) {
    children.retain_mut(|(_, child, _)| !matches!(child.try_wait(), Ok(Some(_))));
    for (_, child, _) in &mut children {
        let sent = match child.id() {
            Some(pid) => send_sigterm(pid).await,
            None => false,
        };
        if !sent {
            let _ = child.start_kill();
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for (what, mut child, log) in children {
        match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(Ok(status)) if !status.success() && status.code().is_some() => eprintln!(
                "drplane dev: {what} exited with {status}; see {}",
                log.display()
            ),
            Ok(_) => {}
            Err(_) => {
                eprintln!(
                    "drplane dev: {what} did not stop within {} s; killing it",
                    grace.as_secs()
                );
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}

/// One `fs` agent of `drplane dev`: agent i runs host `host-i` in site `site-i`.
#[derive(Debug, Clone)]
pub(crate) struct AgentSpec {
    pub id: u16,
    pub host: String,
    pub site: String,
    pub data: PathBuf,
    pub log: PathBuf,
    /// The TOML file dev writes with the agent's demo workloads.
    pub config: PathBuf,
    /// The agent's `--tls-cert/--tls-key/--tls-ca` (`drplane dev --tls`).
    pub tls: Option<crate::tls::TlsPaths>,
}

/// An agent and, while it runs, its process.
pub(crate) struct LocalAgent {
    pub spec: AgentSpec,
    child: Option<Child>,
}

/// The two agents of `drplane dev`, in data sites `site-1` and `site-2`.
pub(crate) fn dev_agent_specs(dir: &Path) -> Vec<AgentSpec> {
    (1..=2u16)
        .map(|i| AgentSpec {
            id: i,
            host: format!("host-{i}"),
            site: format!("site-{i}"),
            data: dir.join(format!("agent-{i}")),
            log: dir.join(format!("agent-{i}.log")),
            config: dir.join(format!("agent-{i}.toml")),
            tls: None,
        })
        .collect()
}

const MIB: u64 = 1 << 20;

/// The demo workloads of agent `spec.id` as an agent config file (`drplane agent
/// --config`), in `project`. Fixed ids: a rerun registers the same records again (an
/// upsert) and finds the volumes already made.
pub(crate) fn agent_config_toml(spec: &AgentSpec, project: &str) -> String {
    let project = toml_string(project);
    let header = "# Written by drplane dev at every start; edits are overwritten.\n\
                  vcpus = 16\nram_mb = 32768\n"
        .to_string();
    let body = match spec.id {
        1 => format!(
            r#"
[[servers]]
id = "dev-web-1"
project = {project}
name = "web-1"
vcpus = 2
ram_mb = 2048
disks = [{{ id = "dev-web-1-root", size_bytes = {root} }}, {{ id = "dev-web-1-data", size_bytes = {data} }}]

[[servers]]
id = "dev-app-1"
project = {project}
name = "app-1"
vcpus = 4
ram_mb = 4096
disks = [{{ id = "dev-app-1-root", size_bytes = {root} }}]

[[shares]]
id = "dev-docs"
project = {project}
name = "docs"
size_bytes = {share}
"#,
            root = 16 * MIB,
            data = 8 * MIB,
            share = 8 * MIB,
        ),
        _ => format!(
            r#"
[[servers]]
id = "dev-batch-{id}"
project = {project}
name = "batch-{id}"
vcpus = 2
ram_mb = 2048
disks = [{{ id = "dev-batch-{id}-root", size_bytes = {root} }}]

[[databases]]
id = "dev-orders-{id}"
project = {project}
name = "orders"
vcpus = 2
ram_mb = 4096
datastore = {{ type = "mysql", version = "8.0" }}
volume = {{ id = "dev-orders-{id}-data", size_bytes = {data} }}
"#,
            id = spec.id,
            root = 16 * MIB,
            data = 8 * MIB,
        ),
    };
    header + &body
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The names among `names` that `GET /drplane/v1/hosts` does not show online.
fn hosts_not_online(doc: &Value, names: &[String]) -> Vec<String> {
    let hosts = doc
        .get("hosts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    names
        .iter()
        .filter(|name| {
            !hosts.iter().any(|h| {
                h.get("name").and_then(Value::as_str) == Some(name.as_str())
                    && h.get("state").and_then(Value::as_str) == Some("online")
            })
        })
        .cloned()
        .collect()
}

/// `kill -TERM pid`; false if that could not be done.
async fn send_sigterm(pid: u32) -> bool {
    match Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
    {
        Ok(status) => status.success(),
        Err(_) => false,
    }
}

fn members_of(status: &Value) -> Vec<Value> {
    status
        .get("members")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The last `n` lines a node wrote since its latest start, indented.
fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail_since_marker(&String::from_utf8_lossy(&bytes), n),
        Err(e) => format!("    (cannot read {}: {e})", path.display()),
    }
}

fn tail_since_marker(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.starts_with(LOG_MARKER))
        .map(|p| p + 1)
        .unwrap_or(0);
    let run = &lines[start..];
    let from = run.len().saturating_sub(n);
    if run.is_empty() {
        return "    (the log is empty)".to_string();
    }
    run[from..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP, with the signal's name.
pub(crate) async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let term_recv = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let hup_recv = async {
        match hup.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = ctrl_c => "SIGINT",
        _ = term_recv => "SIGTERM",
        _ = hup_recv => "SIGHUP",
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating directory {}", args.dir.display()))?;
    let mut specs = local_specs(&args.dir, args.base_port)?;
    let mut agents = dev_agent_specs(&args.dir);
    if args.tls {
        enable_dev_tls(&mut specs, &mut agents, &args.dir.join("tls"))?;
    }
    let mut cluster = LocalCluster::new(specs, Vec::new())?;
    cluster.agents = agents
        .into_iter()
        .map(|spec| LocalAgent { spec, child: None })
        .collect();
    // The admin password the nodes start with, and the demo credentials, live in
    // <dir>/credentials.json so a resumed cluster keeps them.
    let existing_data = cluster.nodes.iter().any(|n| n.spec.data.exists());
    let mut creds = crate::dev_identity::load_or_create(&args.dir, existing_data)?;
    cluster.set_admin_password(creds.admin_password.clone());
    cluster.demo = true;
    // Listen for signals before any child exists.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let outcome = tokio::select! {
        r = run_until_failure(&mut cluster, &args, &mut creds) => r,
        sig = &mut shutdown => {
            println!("drplane dev: {sig} received, stopping the agents and nodes");
            Ok(())
        }
    };
    cluster.stop_all(STOP_GRACE).await;
    println!("drplane dev: stopped");
    outcome
}

/// Starts and forms the cluster, prints the ready line, then watches the children; returns
/// only on a failure.
async fn run_until_failure(
    cluster: &mut LocalCluster,
    args: &DevArgs,
    creds: &mut crate::dev_identity::DevCredentials,
) -> anyhow::Result<()> {
    println!(
        "drplane dev: starting 3 nodes in {} with {}",
        args.dir.display(),
        cluster.exe().display()
    );
    cluster.start_all().await?;
    let formation = cluster.form().await?;
    cluster.wait_ready_all(READY_TIMEOUT).await?;
    match formation {
        Formation::Created => println!(
            "drplane dev: initialized a new cluster: nodes 1, 2 and 3 are voters in sites \
             site-1, site-2 and site-3"
        ),
        Formation::Resumed => println!(
            "drplane dev: resumed the cluster in {} (not re-initialized)",
            args.dir.display()
        ),
    }
    for n in &cluster.nodes {
        println!(
            "  node {}  {}  {}  raft {}  log {}",
            n.spec.id,
            n.spec.site,
            n.spec.url(),
            n.spec.raft,
            n.spec.log.display()
        );
    }
    let first = cluster.nodes[0].spec.url();
    let all: Vec<String> = cluster.nodes.iter().map(|n| n.spec.url()).collect();
    // With TLS, every client command below needs the CA.
    let ca = cluster.nodes[0].spec.tls.as_ref().map(|t| t.ca.clone());
    let (ca_flag, curl_ca, conn_flags) = match &ca {
        Some(path) => {
            println!(
                "TLS: HTTPS and mutual TLS between nodes; CA {} (certificates and keys in {})",
                path.display(),
                path.parent().unwrap_or(Path::new(".")).display()
            );
            println!("  export DRPLANE_CA={}", path.display());
            (
                format!(" --ca {}", path.display()),
                format!(" --cacert {}", path.display()),
                format!(" --endpoint {first} --ca {}", path.display()),
            )
        }
        None => (String::new(), String::new(), String::new()),
    };
    // Credentials for every API family (identity: the demo user is made by the first init).
    if let Some(pw) = cluster
        .init_answer
        .as_ref()
        .and_then(|a| a.get("demo_password"))
        .and_then(Value::as_str)
    {
        creds.demo_password = Some(pw.to_string());
        crate::dev_identity::save(&args.dir, creds)?;
    }
    let demo = match cluster.token() {
        Some(t) => {
            crate::dev_identity::ensure_demo_credentials(
                cluster.http(),
                &first,
                t,
                &args.dir,
                creds,
            )
            .await?
        }
        None => None,
    };
    if !cluster.agents.is_empty() {
        // The demo workloads belong to the demo project (by id, as the API families see
        // it); a cluster without the demo user gets them in a project named "demo".
        let project = demo
            .as_ref()
            .map(|d| d.project_id.clone())
            .unwrap_or_else(|| "demo".to_string());
        cluster
            .ensure_agent_sites(Instant::now() + FORM_TIMEOUT)
            .await?;
        for i in 0..cluster.agents.len() {
            cluster.spawn_agent(i, &project).await?;
        }
        cluster.wait_agents_online(AGENTS_TIMEOUT).await?;
        println!("drplane dev: agents online (driver fs; demo workloads in project {project}):");
        for a in &cluster.agents {
            println!(
                "  agent {}  {}  {}  data {}  config {}  log {}",
                a.spec.id,
                a.spec.host,
                a.spec.site,
                a.spec.data.display(),
                a.spec.config.display(),
                a.spec.log.display()
            );
        }
    }
    print!(
        "{}",
        crate::dev_identity::render(&first, &args.dir, creds, demo.as_ref())
    );
    println!("try (with the admin's DRPLANE_USER and DRPLANE_PASSWORD exported as above):");
    println!(
        "  curl{curl_ca} -H \"X-Auth-Token: $(drplane identity login{conn_flags})\" \
         {first}/drplane/v1/cluster"
    );
    println!(
        "  drplane cluster status --endpoint {}{ca_flag}",
        all.join(",")
    );
    println!(
        "  drplane sites create --endpoint {first}{ca_flag} --name eu-west --description 'first site'"
    );
    println!("  drplane identity users list{conn_flags}");
    if !cluster.agents.is_empty() {
        println!(
            "  curl{curl_ca} -H \"X-Auth-Token: $(drplane identity login{conn_flags})\" \
             {first}/drplane/v1/servers"
        );
    }
    let leader = match cluster.wait_agreed_leader(Duration::from_secs(10)).await {
        Ok((id, term)) => format!("leader is node {id}, term {term}"),
        Err(_) => "the nodes do not agree on a leader yet".to_string(),
    };
    println!("drplane dev: ready ({leader}); Ctrl-C to stop");
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        cluster.check_alive()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_follow_the_port_plan() {
        let specs = local_specs(Path::new("/d"), 7000).unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].http, "127.0.0.1:7001");
        assert_eq!(specs[2].raft, "127.0.0.1:7103");
        assert_eq!(specs[1].site, "site-2");
        assert_eq!(specs[1].data, Path::new("/d/node-2"));
        assert_eq!(specs[1].log, Path::new("/d/node-2.log"));
        assert_eq!(specs[0].url(), "http://127.0.0.1:7001");
        assert!(local_specs(Path::new("/d"), 65500).is_err());
        assert!(local_specs(Path::new("/d"), 80).is_err());
        assert!(specs.iter().all(|s| s.tls.is_none()));
    }

    #[test]
    fn dev_tls_gives_each_node_its_files_and_https() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut specs = local_specs(dir.path(), 7000).unwrap();
        let tls_dir = dir.path().join("tls");
        let mut agents = dev_agent_specs(dir.path());
        let pki = enable_dev_tls(&mut specs, &mut agents, &tls_dir).expect("pki");
        for a in &agents {
            let t = a.tls.as_ref().expect("agent tls");
            assert_eq!(t.cert, tls_dir.join(format!("{}.pem", a.host)));
            crate::tls::TlsMaterial::load(t).expect("agent certificate loads");
        }
        assert_eq!(pki.ca_cert, tls_dir.join("ca.pem"));
        for (i, s) in specs.iter().enumerate() {
            let t = s.tls.as_ref().expect("tls");
            assert_eq!(t.cert, tls_dir.join(format!("node-{}.pem", i + 1)));
            assert_eq!(t.key, tls_dir.join(format!("node-{}-key.pem", i + 1)));
            assert_eq!(t.ca, pki.ca_cert);
            crate::tls::TlsMaterial::load(t).expect("loads");
        }
        assert_eq!(specs[0].url(), "https://127.0.0.1:7001");
        // A rerun keeps the CA.
        let before = std::fs::read(&pki.ca_cert).expect("ca");
        let mut again = local_specs(dir.path(), 7000).unwrap();
        enable_dev_tls(&mut again, &mut agents, &tls_dir).expect("again");
        assert_eq!(std::fs::read(&pki.ca_cert).expect("ca"), before);
        // And the cluster's client trusts it.
        LocalCluster::new(specs, Vec::new()).expect("cluster with a TLS client");
    }

    #[test]
    fn dev_agents_and_their_demo_configs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agents = dev_agent_specs(dir.path());
        assert_eq!(agents.len(), 2);
        assert_eq!(agents[0].host, "host-1");
        assert_eq!(agents[1].site, "site-2");
        assert_eq!(agents[1].data, dir.path().join("agent-2"));
        assert_eq!(agents[0].log, dir.path().join("agent-1.log"));
        let mut all_ids = Vec::new();
        let mut totals = (0, 0, 0);
        for a in &agents {
            let text = agent_config_toml(a, "p\"1");
            // Deterministic: a rerun writes the same file.
            assert_eq!(text, agent_config_toml(a, "p\"1"));
            std::fs::write(&a.config, &text).expect("write");
            let (servers, shares, dbs) =
                crate::agent_cmd::declared_workloads(&a.config, &a.host, &a.site, "p\"1")
                    .expect("the agent accepts the file");
            totals = (
                totals.0 + servers.len(),
                totals.1 + shares.len(),
                totals.2 + dbs.len(),
            );
            all_ids.extend(servers.into_iter().chain(shares).chain(dbs));
        }
        assert_eq!(totals, (3, 1, 1));
        let n = all_ids.len();
        all_ids.sort();
        all_ids.dedup();
        assert_eq!(all_ids.len(), n, "ids are unique across the agents");
    }

    #[test]
    fn hosts_online_reads_the_host_listing() {
        let names = vec!["host-1".to_string(), "host-2".to_string()];
        let doc = serde_json::json!({"hosts": [
            {"name": "host-1", "state": "online"},
            {"name": "host-2", "state": "offline"},
            {"name": "other", "state": "online"},
        ]});
        assert_eq!(hosts_not_online(&doc, &names), vec!["host-2".to_string()]);
        assert_eq!(hosts_not_online(&Value::Null, &names), names);
        let doc = serde_json::json!({"hosts": [
            {"name": "host-2", "state": "online"},
            {"name": "host-1", "state": "online"},
        ]});
        assert!(hosts_not_online(&doc, &names).is_empty());
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("demo"), "\"demo\"");
        let v: toml::Value =
            toml::from_str(&format!("k = {}", toml_string("a\"b\\c\n"))).expect("toml");
        assert_eq!(v["k"].as_str(), Some("a\"b\\c\n"));
    }

    #[test]
    fn tail_shows_only_the_latest_run() {
        let text = format!(
            "{LOG_MARKER} 1 ====\nold 1\nold 2\n{LOG_MARKER} 1 ====\nnew 1\nnew 2\nnew 3\n"
        );
        assert_eq!(tail_since_marker(&text, 2), "    new 2\n    new 3");
        assert_eq!(
            tail_since_marker(&text, 10),
            "    new 1\n    new 2\n    new 3"
        );
        assert_eq!(tail_since_marker("a\nb\n", 1), "    b");
        assert_eq!(
            tail_since_marker(&format!("{LOG_MARKER} 1\n"), 3),
            "    (the log is empty)"
        );
    }
}
