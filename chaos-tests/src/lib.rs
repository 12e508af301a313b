//! Black-box harness for tests on real `drplane` processes: start a cluster of real
//! servers on 127.0.0.1 with their own data directories, talk to them only through the
//! public HTTP API and the CLI, and inject process faults (kill -9, SIGTERM, SIGSTOP).
//!
//! Architecture invariant: nothing here links drplane's crates; it drives the binary.
//!
//! Identity: every node starts with `DRPLANE_ADMIN_PASSWORD=`[`ADMIN_PASSWORD`]; after the
//! init, [`Cluster::start`] logs in as `admin` (`POST /v3/auth/tokens`) and `Cluster::http`
//! sends that token as `X-Auth-Token` on every request (a request that sets its own
//! `X-Auth-Token` keeps it). [`cli`] runs the CLI with `DRPLANE_USER=admin` and
//! `DRPLANE_PASSWORD`, so it logs in the same way.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

pub mod chaos;
pub mod history;
pub mod linearizability;
pub mod net;
pub mod workload;

/// Raft timing for tests that watch terms and leaders: slower elections than the product's
/// defaults (heartbeat 60 ms, elections 300–600 ms), because several clusters share two
/// cores in CI and a debug build under load must not see spurious elections.
pub const SLOW_ELECTIONS: &[&str] = &[
    "--heartbeat-ms",
    "60",
    "--election-min-ms",
    "300",
    "--election-max-ms",
    "600",
];

/// The `drplane` binary: `$DRPLANE_BIN`, or the one cargo built next to this test binary,
/// pinned for the life of this process (see [`pin_binary`]).
pub fn drplane_bin() -> anyhow::Result<PathBuf> {
    // Pinned once per process, under a lock: tests run on several threads, and two that
    // pinned at once would replace each other's file while the other execs it.
    static PINNED: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut pinned = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = pinned.as_ref() {
        return Ok(p.clone());
    }
    let bin = locate_drplane_bin()?;
    let p = pin_binary(&bin).unwrap_or(bin);
    *pinned = Some(p.clone());
    Ok(p)
}

fn locate_drplane_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("DRPLANE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/<test> -> target/<profile>/drplane
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary path {}", exe.display()))?;
    let bin = profile_dir.join("drplane");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (`cargo build -p drplane-node`) or set DRPLANE_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// A copy of `bin` private to this process, `<tmp>/drplane-pinned/<pid>-drplane`,
/// so that a rebuild of the shared target directory during a long test does not swap the
/// binary under the nodes it restarts. Links of processes that are gone are removed.
pub fn pin_binary(bin: &Path) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join("drplane-pinned");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    let pinned = dir.join(format!("{}-drplane", std::process::id()));
    // Made under a temporary name and renamed into place: an exec never sees a file
    // still being written (ETXTBSY).
    let tmp = dir.join(format!(".{}-drplane.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // A copy, never a hard link: the linker may rewrite the target directory's file in
    // place, and a link would see it truncated mid-build.
    std::fs::copy(bin, &tmp)
        .with_context(|| format!("copying {} to {}", bin.display(), tmp.display()))?;
    std::fs::rename(&tmp, &pinned)
        .with_context(|| format!("renaming {} to {}", tmp.display(), pinned.display()))?;
    Ok(pinned)
}

/// The password of user `admin` in every test cluster (the servers'
/// `DRPLANE_ADMIN_PASSWORD`).
pub const ADMIN_PASSWORD: &str = "chaos-admin-password";

/// A port that was free a moment ago on 127.0.0.1.
///
/// Ports come from 20000-31999, below Linux's ephemeral range (32768+), so an outgoing
/// connection of this or another process cannot take the port between this probe and
/// the server's bind; each process walks its own window (by pid) and never hands out the
/// same port twice.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000;
    let window = (std::process::id() % 97) * 120;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (window + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {LOW}-{}", LOW + SPAN - 1)
}

/// How one node is started.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: u64,
    pub site: String,
    pub http: String,
    pub raft: String,
    pub data: PathBuf,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    /// TLS files given to the node (`--tls-cert/--tls-key/--tls-ca`); None for plain HTTP.
    pub tls: Option<NodeTls>,
    /// The network namespace it runs in ([`Cluster::start_in_net`]); None: the host's.
    pub netns: Option<String>,
}

impl NodeSpec {
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.http)
    }
}

pub struct NodeProc {
    pub spec: NodeSpec,
    child: Option<Child>,
}

impl NodeProc {
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// A cluster of real drplane processes; every child is killed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub http: reqwest::Client,
    extra_args: Vec<String>,
    /// The cluster CA of a TLS cluster ([`Cluster::start_tls`]); new nodes get
    /// certificates from it.
    pub pki: Option<TestPki>,
    /// The admin's token once logged in ([`Cluster::login_admin`]); `http` sends it.
    pub token: Option<String>,
    /// Agent processes by host name ([`Cluster::spawn_agent`]).
    pub agents: BTreeMap<String, AgentProc>,
    /// The private network of a cluster made by [`Cluster::start_in_net`]: every node in
    /// its own namespace, links that can be cut.
    pub net: Option<net::Net>,
    /// Nodes whose data directory is a small tmpfs of this many MiB (made when the node is
    /// spawned; see [`Cluster::fill_disk`]).
    pub small_disks: BTreeMap<u64, u64>,
    mounts: Vec<PathBuf>,
}

/// The answer of a Keystone login: a [`Reply`] plus the `X-Subject-Token` header.
#[derive(Debug, Clone)]
pub struct LoginReply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
    pub text: String,
    pub subject_token: Option<String>,
}

/// The answer of an HTTP call: status, headers we care about, and the JSON body (Null if
/// the body was empty or not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
    pub text: String,
}

impl Cluster {
    /// An empty cluster whose nodes get `extra_args` on their command lines.
    pub fn empty(extra_args: &[&str]) -> anyhow::Result<Cluster> {
        Ok(Cluster {
            dir: tempfile::Builder::new()
                .prefix("drplane-test-")
                .tempdir()
                .context("temp dir")?,
            nodes: BTreeMap::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(32)
                .build()
                .context("http client")?,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            pki: None,
            token: None,
            agents: BTreeMap::new(),
            net: None,
            small_disks: BTreeMap::new(),
            mounts: Vec::new(),
        })
    }

    /// [`Cluster::start`] with every node in its own network namespace on a private
    /// bridge (see [`net`]), so that links between nodes can be cut; nodes listed in
    /// `small_disks` (id, MiB) keep their data on a tmpfs of that size. Needs root.
    pub async fn start_in_net(
        sites: &[&str],
        extra_args: &[&str],
        small_disks: &[(u64, u64)],
    ) -> anyhow::Result<Cluster> {
        let mut c = Cluster::empty(extra_args)?;
        c.net = Some(net::Net::new()?);
        c.small_disks = small_disks.iter().copied().collect();
        c.bootstrap(sites).await?;
        Ok(c)
    }

    /// The ballast file that fills a small disk.
    fn ballast(&self, id: u64) -> anyhow::Result<PathBuf> {
        if !self.small_disks.contains_key(&id) {
            bail!("node {id} has no small disk");
        }
        Ok(self.spec(id)?.data.join("ballast"))
    }

    /// Fill node `id`'s small disk to the last byte (a ballast file written until ENOSPC);
    /// returns the bytes written.
    pub fn fill_disk(&self, id: u64) -> anyhow::Result<u64> {
        use std::io::Write;
        let path = self.ballast(id)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let chunk = vec![0xa5u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e).context(format!("filling {}", path.display())),
            }
        }
        // Whatever fits in the last partial page.
        for size in [4096usize, 512, 1] {
            while f.write(&chunk[..size]).map(|n| n > 0).unwrap_or(false) {
                written += size as u64;
            }
        }
        Ok(written)
    }

    /// Remove the ballast of [`Cluster::fill_disk`].
    pub fn free_disk(&self, id: u64) -> anyhow::Result<()> {
        let path = self.ballast(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context(format!("removing {}", path.display())),
        }
    }

    /// A client for this cluster's nodes (trusting the cluster CA in a TLS cluster) that
    /// sends `token` as `X-Auth-Token` on every request.
    pub fn client_with_token(&self, token: Option<&str>) -> anyhow::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(32);
        if let Some(pki) = &self.pki {
            let pem = std::fs::read(&pki.ca_cert)
                .with_context(|| format!("reading {}", pki.ca_cert.display()))?;
            b = b
                .use_rustls_tls()
                .tls_built_in_root_certs(false)
                .add_root_certificate(
                    reqwest::Certificate::from_pem(&pem).context("CA certificate")?,
                );
        }
        if let Some(t) = token {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(
                "x-auth-token",
                reqwest::header::HeaderValue::from_str(t).context("token header")?,
            );
            b = b.default_headers(headers);
        }
        b.build().context("http client")
    }

    /// `POST /v3/auth/tokens` on node `id` as `user` (password method, scoped to `project`
    /// or the user's default project): the token, or the failed answer as an error.
    pub async fn login(
        &self,
        id: u64,
        user: &str,
        password: &str,
        project: Option<&str>,
    ) -> anyhow::Result<String> {
        let r = self.keystone_login(id, user, password, project).await?;
        if r.status != 201 {
            bail!("login as {user} on node {id}: {} {}", r.status, r.text);
        }
        r.subject_token
            .ok_or_else(|| anyhow!("login as {user}: no X-Subject-Token in the answer"))
    }

    /// The raw answer of a Keystone password login (sent without any X-Auth-Token).
    pub async fn keystone_login(
        &self,
        id: u64,
        user: &str,
        password: &str,
        project: Option<&str>,
    ) -> anyhow::Result<LoginReply> {
        let mut auth = serde_json::json!({"identity": {"methods": ["password"], "password": {
            "user": {"name": user, "domain": {"name": "Default"}, "password": password}}}});
        if let Some(p) = project {
            auth["scope"] =
                serde_json::json!({"project": {"name": p, "domain": {"name": "Default"}}});
        }
        let resp = self
            .client_with_token(None)?
            .post(format!("{}/v3/auth/tokens", self.url(id)))
            .json(&serde_json::json!({ "auth": auth }))
            .send()
            .await?;
        let subject_token = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let reply = to_reply(resp).await;
        Ok(LoginReply {
            status: reply.status,
            retry_after: reply.retry_after,
            body: reply.body,
            text: reply.text,
            subject_token,
        })
    }

    /// Logs in as `admin` on node `id` (retrying while the cluster settles) and makes
    /// `http` send the token.
    pub async fn login_admin(&mut self, id: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let token = loop {
            match self.login(id, "admin", ADMIN_PASSWORD, Some("admin")).await {
                Ok(t) => break t,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.http = self.client_with_token(Some(&token))?;
        self.token = Some(token);
        Ok(())
    }

    /// An empty TLS cluster: a fresh CA under `<dir>/pki`, every node started with a
    /// certificate from it, and an HTTP client that trusts only that CA.
    pub fn empty_tls(extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut c = Cluster::empty(extra_args)?;
        let pki = TestPki::new(&c.dir.path().join("pki"), "drplane test CA")?;
        c.http = https_client(&[&pki.ca_cert])?;
        c.pki = Some(pki);
        Ok(c)
    }

    /// [`Cluster::start`] with TLS on every node: HTTPS API, mutual TLS between nodes.
    pub async fn start_tls(sites: &[&str], extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut c = Cluster::empty_tls(extra_args)?;
        c.bootstrap(sites).await?;
        Ok(c)
    }

    /// Start `sites.len()` nodes (node i+1 in `sites[i]`), initialize node 1, add the
    /// others as learners and promote them; returns once every node is ready.
    pub async fn start(sites: &[&str], extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut c = Cluster::empty(extra_args)?;
        c.bootstrap(sites).await?;
        Ok(c)
    }

    /// Start, initialize and promote `sites.len()` nodes (see [`Cluster::start`]).
    async fn bootstrap(&mut self, sites: &[&str]) -> anyhow::Result<()> {
        let c = self;
        for (i, site) in sites.iter().enumerate() {
            c.spawn_new(i as u64 + 1, site)?;
        }
        for id in c.ids() {
            c.wait_live(id, Duration::from_secs(20)).await?;
        }
        let r = c.post(1, "/drplane/v1/cluster/init", &Value::Null).await?;
        if r.status != 200 {
            bail!("init failed: {} {}", r.status, r.text);
        }
        c.login_admin(1).await?;
        for id in c.ids().into_iter().skip(1) {
            c.add_member(1, id).await?;
        }
        // Promote so that no site ever holds a majority of the voters (the cluster refuses
        // that): each time, a learner of the site with the fewest voters.
        let site_of = |id: u64| sites[id as usize - 1];
        let mut voters: Vec<u64> = vec![1];
        let mut learners: Vec<u64> = c.ids().into_iter().skip(1).collect();
        while !learners.is_empty() {
            let count = |site: &str| voters.iter().filter(|v| site_of(**v) == site).count();
            let pos = (0..learners.len())
                .min_by_key(|i| (count(site_of(learners[*i])), learners[*i]))
                .unwrap_or(0);
            let id = learners.remove(pos);
            voters.push(id);
            let r = c
                .post(
                    1,
                    &format!("/drplane/v1/cluster/members/{id}/promote"),
                    &Value::Null,
                )
                .await?;
            if r.status != 200 {
                bail!("promote {id} failed: {} {}", r.status, r.text);
            }
        }
        for id in c.ids() {
            c.wait_ready(id, Duration::from_secs(20)).await?;
        }
        Ok(())
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn spec(&self, id: u64) -> anyhow::Result<&NodeSpec> {
        self.nodes
            .get(&id)
            .map(|n| &n.spec)
            .ok_or_else(|| anyhow!("no node {id}"))
    }

    pub fn url(&self, id: u64) -> String {
        self.nodes
            .get(&id)
            .map(|n| n.spec.url())
            .unwrap_or_default()
    }

    /// Define and start a new node (not yet a member). In a TLS cluster it gets a
    /// certificate from the cluster CA.
    pub fn spawn_new(&mut self, id: u64, site: &str) -> anyhow::Result<()> {
        let tls = match &self.pki {
            Some(pki) => Some(pki.issue(&format!("node-{id}"), &["127.0.0.1", "localhost"])?),
            None => None,
        };
        self.spawn_new_with_tls(id, site, tls)
    }

    /// Define and start a new node with the given TLS files (None: plain HTTP), e.g. a
    /// certificate from another CA.
    pub fn spawn_new_with_tls(
        &mut self,
        id: u64,
        site: &str,
        tls: Option<NodeTls>,
    ) -> anyhow::Result<()> {
        let data = self.dir.path().join(format!("node-{id}"));
        let (http, raft, netns) = match &mut self.net {
            Some(net) => {
                let ns = net.add_node(id)?;
                let ip = net.ip(id);
                (format!("{ip}:8080"), format!("{ip}:7070"), Some(ns))
            }
            None => (
                format!("127.0.0.1:{}", free_port()?),
                format!("127.0.0.1:{}", free_port()?),
                None,
            ),
        };
        if let Some(mib) = self.small_disks.get(&id).copied() {
            std::fs::create_dir_all(&data)
                .with_context(|| format!("creating {}", data.display()))?;
            let size = format!("size={mib}m");
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
                .arg(&data)
                .status()
                .context("running mount")?;
            if !status.success() {
                bail!("mounting a {mib} MiB tmpfs on {} failed", data.display());
            }
            self.mounts.push(data.clone());
        }
        let spec = NodeSpec {
            id,
            site: site.to_string(),
            http,
            raft,
            log: self.dir.path().join(format!("node-{id}.log")),
            data,
            extra_args: self.extra_args.clone(),
            tls,
            netns,
        };
        let child = spawn(&spec)?;
        self.nodes.insert(
            id,
            NodeProc {
                spec,
                child: Some(child),
            },
        );
        Ok(())
    }

    /// Ask node `via` to add node `id` as a learner.
    pub async fn add_member(&self, via: u64, id: u64) -> anyhow::Result<Reply> {
        let spec = self.spec(id)?;
        let body =
            serde_json::json!({"id": id, "site": spec.site, "http": spec.http, "raft": spec.raft});
        let r = self.post(via, "/drplane/v1/cluster/members", &body).await?;
        if r.status != 201 {
            bail!("add member {id} failed: {} {}", r.status, r.text);
        }
        Ok(r)
    }

    /// SIGKILL a node (no chance to flush anything).
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// SIGTERM a node and wait for it to exit.
    pub fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        if let Some(mut c) = node.child.take() {
            signal(c.id(), "TERM")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            bail!("node {id} did not stop within 10 s of SIGTERM");
        }
        Ok(())
    }

    /// SIGSTOP / SIGCONT a node.
    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        let pid = self
            .nodes
            .get(&id)
            .and_then(|n| n.pid())
            .ok_or_else(|| anyhow!("node {id} not running"))?;
        signal(pid, "STOP")
    }

    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        let pid = self
            .nodes
            .get(&id)
            .and_then(|n| n.pid())
            .ok_or_else(|| anyhow!("node {id} not running"))?;
        signal(pid, "CONT")
    }

    /// Start a stopped or killed node again with the same identity and data.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        if node.is_running() {
            bail!("node {id} is still running");
        }
        node.child = Some(spawn(&node.spec)?);
        Ok(())
    }

    pub fn is_running(&mut self, id: u64) -> bool {
        self.nodes.get_mut(&id).is_some_and(|n| n.is_running())
    }

    /// The last `n` lines of a node's log, for failure messages.
    pub fn log_tail(&self, id: u64, n: usize) -> String {
        let Some(node) = self.nodes.get(&id) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&node.spec.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log_text(&self, id: u64) -> String {
        self.nodes
            .get(&id)
            .and_then(|n| std::fs::read_to_string(&n.spec.log).ok())
            .unwrap_or_default()
    }

    pub async fn request(
        &self,
        id: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.url(id), path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            if !b.is_null() {
                req = req.json(b);
            }
        }
        let resp = req.send().await?;
        Ok(to_reply(resp).await)
    }

    pub async fn get(&self, id: u64, path: &str) -> anyhow::Result<Reply> {
        self.request(id, reqwest::Method::GET, path, None, &[])
            .await
    }

    pub async fn post(&self, id: u64, path: &str, body: &Value) -> anyhow::Result<Reply> {
        self.request(id, reqwest::Method::POST, path, Some(body), &[])
            .await
    }

    pub async fn wait_live(&mut self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.get(id, "/livez").await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if !self.is_running(id) {
                bail!("node {id} exited:\n{}", self.log_tail(id, 30));
            }
            if Instant::now() > deadline {
                bail!(
                    "node {id} not live within {timeout:?}:\n{}",
                    self.log_tail(id, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_ready(&mut self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.get(id, "/readyz").await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if !self.is_running(id) {
                bail!("node {id} exited:\n{}", self.log_tail(id, 30));
            }
            if Instant::now() > deadline {
                bail!(
                    "node {id} not ready within {timeout:?}:\n{}",
                    self.log_tail(id, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The cluster status as node `id` reports it.
    pub async fn status(&self, id: u64) -> anyhow::Result<Value> {
        let r = self.get(id, "/drplane/v1/cluster").await?;
        if r.status != 200 {
            bail!("status from {id}: {} {}", r.status, r.text);
        }
        Ok(r.body)
    }

    /// The leader, as agreed by the running nodes that answer, waiting up to `timeout`.
    pub async fn wait_leader(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for id in self.ids() {
                if !self.is_running(id) {
                    continue;
                }
                if let Ok(r) = self.get(id, "/drplane/v1/cluster?consistency=stale").await {
                    if let Some(l) = r.body.get("leader_id").and_then(Value::as_u64) {
                        seen.push(l);
                    }
                }
            }
            if let Some(first) = seen.first() {
                if seen.iter().all(|l| l == first) && self.is_running(*first) {
                    return Ok(*first);
                }
            }
            if Instant::now() > deadline {
                bail!("no agreed leader within {timeout:?} (seen {seen:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Site names on node `id`, read as `consistency` (linearizable or stale).
    pub async fn site_names(&self, id: u64, consistency: &str) -> anyhow::Result<Vec<String>> {
        let r = self
            .get(id, &format!("/drplane/v1/sites?consistency={consistency}"))
            .await?;
        if r.status != 200 {
            bail!("list sites on {id}: {} {}", r.status, r.text);
        }
        Ok(r.body["sites"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in self.agents.values_mut() {
            if let Some(mut c) = agent.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for node in self.nodes.values_mut() {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for m in self.mounts.drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if std::env::var_os("DRPLANE_KEEP_TEST_DIRS").is_some() {
            let path = self.dir.path().to_path_buf();
            eprintln!("keeping test directory {}", path.display());
            let dir = std::mem::replace(
                &mut self.dir,
                match tempfile::tempdir() {
                    Ok(d) => d,
                    Err(_) => return,
                },
            );
            let _ = dir.keep();
        }
    }
}

fn spawn(spec: &NodeSpec) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening {}", spec.log.display()))?;
    let log2 = log.try_clone()?;
    // `ip netns exec` enters the namespace and execs the binary in place: the child's pid
    // is the server's, so kill -9 and SIGSTOP reach it.
    let mut cmd = match &spec.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(drplane_bin()?);
            c
        }
        None => Command::new(drplane_bin()?),
    };
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
        .args(&spec.extra_args)
        .args(spec.tls.iter().flat_map(|t| {
            [
                "--tls-cert".into(),
                t.cert.clone().into_os_string(),
                "--tls-key".into(),
                t.key.clone().into_os_string(),
                "--tls-ca".into(),
                t.ca.clone().into_os_string(),
            ]
        }))
        .env(
            "DRPLANE_LOG",
            std::env::var("DRPLANE_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .env("DRPLANE_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    cmd.spawn().context("spawning drplane server")
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

async fn to_reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after");
    let content_type = header("content-type");
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        retry_after,
        content_type,
        body,
        text,
    }
}

/// Run the `drplane` CLI with `args` as `admin` (`DRPLANE_USER`/`DRPLANE_PASSWORD` in its
/// environment); returns (exit success, stdout, stderr).
pub fn cli(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    cli_env(
        args,
        &[
            ("DRPLANE_USER", "admin"),
            ("DRPLANE_PASSWORD", ADMIN_PASSWORD),
        ],
    )
}

/// Run the `drplane` CLI with `args` and exactly the `DRPLANE_*` credentials in `env`.
pub fn cli_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Command::new(drplane_bin()?);
    for var in [
        "DRPLANE_TOKEN",
        "DRPLANE_USER",
        "DRPLANE_PASSWORD",
        "DRPLANE_PROJECT",
        "DRPLANE_CA",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running drplane cli")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// TLS files of one node.
#[derive(Debug, Clone)]
pub struct NodeTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA the node trusts for its peers.
    pub ca: PathBuf,
}

/// A throwaway certificate authority for TLS tests (made here with rcgen: the harness
/// never links drplane's own PKI code).
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA certificate (PEM).
    pub ca_cert: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestPki {
    /// A new CA named `common_name`, its certificate written to `<dir>/ca.pem`.
    pub fn new(dir: &Path, common_name: &str) -> anyhow::Result<TestPki> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let ca_key = KeyPair::generate()?;
        let ca = params.self_signed(&ca_key)?;
        let ca_cert = dir.join("ca.pem");
        std::fs::write(&ca_cert, ca.pem())
            .with_context(|| format!("writing {}", ca_cert.display()))?;
        Ok(TestPki {
            dir: dir.to_path_buf(),
            ca_cert,
            ca,
            ca_key,
        })
    }

    /// A certificate for `hosts` (DNS names or IPs), for server and client authentication,
    /// written as `<name>.pem` / `<name>-key.pem`; the returned files trust this CA.
    pub fn issue(&self, name: &str, hosts: &[&str]) -> anyhow::Result<NodeTls> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca, &self.ca_key)?;
        let tls = NodeTls {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
            ca: self.ca_cert.clone(),
        };
        std::fs::write(&tls.cert, cert.pem())
            .with_context(|| format!("writing {}", tls.cert.display()))?;
        std::fs::write(&tls.key, key.serialize_pem())
            .with_context(|| format!("writing {}", tls.key.display()))?;
        Ok(tls)
    }
}

/// An HTTPS client that trusts exactly the CA certificates in `ca_pems` (no system roots).
pub fn https_client(ca_pems: &[&Path]) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(32);
    for path in ca_pems {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        b = b.add_root_certificate(
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("CA certificate {}", path.display()))?,
        );
    }
    b.build().context("https client")
}

// ---- agents ----

/// How one agent (`drplane agent`) is started.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub host: String,
    pub site: String,
    /// `sim` or `fs`.
    pub driver: String,
    pub data: PathBuf,
    pub log: PathBuf,
    /// The nodes' URLs it discovers the leader through.
    pub cluster: String,
    pub extra_args: Vec<String>,
}

pub struct AgentProc {
    pub spec: AgentSpec,
    child: Option<Child>,
}

impl AgentProc {
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

fn spawn_agent_proc(spec: &AgentSpec) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening {}", spec.log.display()))?;
    let log2 = log.try_clone()?;
    let mut cmd = Command::new(drplane_bin()?);
    for var in ["DRPLANE_TOKEN", "DRPLANE_PROJECT"] {
        cmd.env_remove(var);
    }
    cmd.arg("agent")
        .arg("--cluster")
        .arg(&spec.cluster)
        .arg("--host")
        .arg(&spec.host)
        .arg("--site")
        .arg(&spec.site)
        .arg("--driver")
        .arg(&spec.driver)
        .arg("--data")
        .arg(&spec.data)
        .args(&spec.extra_args)
        .env(
            "DRPLANE_LOG",
            std::env::var("DRPLANE_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .env("DRPLANE_USER", "admin")
        .env("DRPLANE_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    cmd.spawn().context("spawning drplane agent")
}

impl Cluster {
    /// The nodes' URLs, comma-separated (what agents get as `--cluster`).
    pub fn cluster_urls(&self) -> String {
        self.nodes
            .values()
            .map(|n| n.spec.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Start an agent for `host` in `site` with `driver` (`sim` or `fs`), logging in as
    /// admin to find the leader; its data and log live under the cluster's directory.
    pub fn spawn_agent(&mut self, host: &str, site: &str, driver: &str) -> anyhow::Result<()> {
        self.spawn_agent_with(host, site, driver, &[])
    }

    /// [`Cluster::spawn_agent`] with extra command-line arguments.
    pub fn spawn_agent_with(
        &mut self,
        host: &str,
        site: &str,
        driver: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<()> {
        if self.agents.contains_key(host) {
            bail!("agent {host} exists; use restart_agent");
        }
        let spec = AgentSpec {
            host: host.to_string(),
            site: site.to_string(),
            driver: driver.to_string(),
            data: self.dir.path().join(format!("agent-{host}")),
            log: self.dir.path().join(format!("agent-{host}.log")),
            cluster: self.cluster_urls(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        let child = spawn_agent_proc(&spec)?;
        self.agents.insert(
            host.to_string(),
            AgentProc {
                spec,
                child: Some(child),
            },
        );
        Ok(())
    }

    fn agent_pid(&self, host: &str) -> anyhow::Result<u32> {
        self.agents
            .get(host)
            .and_then(|a| a.pid())
            .ok_or_else(|| anyhow!("agent {host} not running"))
    }

    /// SIGKILL an agent.
    pub fn kill_agent(&mut self, host: &str) -> anyhow::Result<()> {
        let agent = self
            .agents
            .get_mut(host)
            .ok_or_else(|| anyhow!("no agent {host}"))?;
        if let Some(mut c) = agent.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Start a killed agent again with the same host, site and data.
    pub fn restart_agent(&mut self, host: &str) -> anyhow::Result<()> {
        let agent = self
            .agents
            .get_mut(host)
            .ok_or_else(|| anyhow!("no agent {host}"))?;
        if agent.is_running() {
            bail!("agent {host} is still running");
        }
        agent.child = Some(spawn_agent_proc(&agent.spec)?);
        Ok(())
    }

    /// SIGSTOP / SIGCONT an agent.
    pub fn pause_agent(&mut self, host: &str) -> anyhow::Result<()> {
        signal(self.agent_pid(host)?, "STOP")
    }

    pub fn resume_agent(&mut self, host: &str) -> anyhow::Result<()> {
        signal(self.agent_pid(host)?, "CONT")
    }

    pub fn is_agent_running(&mut self, host: &str) -> bool {
        self.agents.get_mut(host).is_some_and(|a| a.is_running())
    }

    pub fn agent_log(&self, host: &str) -> String {
        self.agents
            .get(host)
            .and_then(|a| std::fs::read_to_string(&a.spec.log).ok())
            .unwrap_or_default()
    }

    /// What the agent recorded of every attempt it ended (`<data>/agent/completions.jsonl`,
    /// one JSON object per line: task_id, job_id, kind, host, term, attempt, outcome,
    /// reason, started_at_ms, finished_at_ms).
    pub fn agent_completions(&self, host: &str) -> Vec<Value> {
        let Some(a) = self.agents.get(host) else {
            return Vec::new();
        };
        std::fs::read_to_string(a.spec.data.join("agent").join("completions.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `GET /drplane/v1/hosts` through any running node: host name -> host.
    pub async fn hosts(&mut self) -> anyhow::Result<BTreeMap<String, Value>> {
        let mut last = String::from("no node is running");
        for id in self.ids() {
            if !self.is_running(id) {
                continue;
            }
            match self.get(id, "/drplane/v1/hosts").await {
                Ok(r) if r.status == 200 => {
                    return Ok(r.body["hosts"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|h| {
                                    h["name"].as_str().map(|n| (n.to_string(), h.clone()))
                                })
                                .collect()
                        })
                        .unwrap_or_default())
                }
                Ok(r) => last = format!("node {id}: {} {}", r.status, r.text),
                Err(e) => last = format!("node {id}: {e}"),
            }
        }
        bail!("cannot list hosts: {last}")
    }

    /// Waits until every host in `hosts` shows `state` (`online` or `offline`).
    pub async fn wait_hosts_state(
        &mut self,
        hosts: &[&str],
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<BTreeMap<String, Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.hosts().await;
            if let Ok(all) = &seen {
                if hosts
                    .iter()
                    .all(|h| all.get(*h).is_some_and(|v| v["state"] == state))
                {
                    return seen;
                }
            }
            if Instant::now() > deadline {
                let states: Vec<String> = match &seen {
                    Ok(all) => all
                        .iter()
                        .map(|(n, v)| format!("{n}={}", v["state"]))
                        .collect(),
                    Err(e) => vec![e.to_string()],
                };
                let logs: Vec<String> = hosts
                    .iter()
                    .map(|h| {
                        let text = self.agent_log(h);
                        let lines: Vec<&str> = text.lines().collect();
                        format!(
                            "--- agent {h}:\n{}",
                            lines[lines.len().saturating_sub(15)..].join("\n")
                        )
                    })
                    .collect();
                bail!(
                    "hosts {hosts:?} not {state} within {timeout:?} (seen {states:?})\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
