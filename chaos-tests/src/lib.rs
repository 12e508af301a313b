//! Black-box harness for tests on real `drplane` processes: start a cluster of real
//! servers on 127.0.0.1 with their own data directories, talk to them only through the
//! public HTTP API and the CLI, and inject process faults (kill -9, SIGTERM, SIGSTOP).
//!
//! Architecture invariant: nothing here links drplane's crates; it drives the binary.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

/// The `drplane` binary: `$DRPLANE_BIN`, or the one cargo built next to this test binary.
pub fn drplane_bin() -> anyhow::Result<PathBuf> {
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

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
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
}

impl NodeSpec {
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
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
        })
    }

    /// Start `sites.len()` nodes (node i+1 in `sites[i]`), initialize node 1, add the
    /// others as learners and promote them; returns once every node is ready.
    pub async fn start(sites: &[&str], extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut c = Cluster::empty(extra_args)?;
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
        for id in c.ids().into_iter().skip(1) {
            c.add_member(1, id).await?;
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
        Ok(c)
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

    /// Define and start a new node (not yet a member).
    pub fn spawn_new(&mut self, id: u64, site: &str) -> anyhow::Result<()> {
        let data = self.dir.path().join(format!("node-{id}"));
        let spec = NodeSpec {
            id,
            site: site.to_string(),
            http: format!("127.0.0.1:{}", free_port()?),
            raft: format!("127.0.0.1:{}", free_port()?),
            log: self.dir.path().join(format!("node-{id}.log")),
            data,
            extra_args: self.extra_args.clone(),
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
        for node in self.nodes.values_mut() {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
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
    let mut cmd = Command::new(drplane_bin()?);
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
        .env(
            "DRPLANE_LOG",
            std::env::var("DRPLANE_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
        )
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

/// Run the `drplane` CLI with `args`; returns (exit success, stdout, stderr).
pub fn cli(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(drplane_bin()?)
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
