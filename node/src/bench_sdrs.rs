//! `drplane bench sdrs-failover`: a Huawei SDRS group failover of many protected instances
//! on `sim` agents, from the API call to the job's SUCCESS, split into agent time and
//! control-plane time.
//!
//! Set-up (not timed): its own three-node cluster (the `drplane dev` layout from
//! `--base-port`); sites `sdrs-a` and `sdrs-b` with `--hosts-per-site` agents each, run in
//! this process with the `sim` driver (their own control sessions, heartbeats and task
//! streams, exactly as real agents; every driver operation takes `--sim-latency-ms`);
//! `--instances` stopped servers of one `--disk-mib` disk declared by the `sdrs-a` agents;
//! a project with a `member` user and its AK/SK (native identity API); then, through the
//! SDRS API with requests signed as the Huawei SDK signs them
//! (`drplane_api::auth::huawei::Signer`): the protection group, one protected instance per
//! server (each creates its DR server and a fully synced replication pair), enable
//! protection, and a check that every pair is protected and synced.
//!
//! Each trial times the group operation(s) chosen by `--op`:
//! - `reverse`: planned failover (`reverse-server-group`) to the other side: per pair a
//!   final sync, a fence of the old primary and a promote of the copy;
//! - `failover`: unplanned failover (`failover-server-group`): per pair a promote; the
//!   group is then re-protected (`start-server-group`, not timed) for the next trial;
//! - `both` (default): a reverse, then a failover (which brings production back), then the
//!   re-protect, so every trial starts from the same state.
//!
//! What is measured, per timed operation:
//! - `total`: from sending `POST /v1/{p}/server-groups/{id}/action` to the first
//!   `GET /v1/{p}/jobs/{job_id}` that shows SUCCESS (polled every `--poll-ms`, so up to
//!   one poll interval late). Every call goes to the leader.
//! - `agent`: the time during which at least one task of the job (the group job or one of
//!   its sub-jobs) was executing on some agent: the length of the union of the intervals
//!   `[started_at_ms, finished_at_ms]` of those tasks' attempts, as every agent recorded
//!   them in `<state_dir>/completions.jsonl`, clipped to the timed window. Overlapping
//!   tasks on several agents count once: this is the critical path the agents impose, not
//!   their summed work (`task_ms_sum` shows that).
//! - `control_plane = total − agent`: everything else — the HTTP call and authentication,
//!   planning the job in one Raft command, dispatching every task, each task's result
//!   committed, the dependent tasks becoming ready, the sub-jobs and the job ending, and
//!   the poll that sees it.
//! - `first_task`: call sent → first task started; `tail`: last task finished → SUCCESS
//!   seen.
//!
//! Medians over the trials are printed per operation, with the disk's fdatasync latency.
//! The target (issue 5) is a control-plane time under 2 s for 100 instances.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use drplane_agent::runtime::{read_completions, Agent, RuntimeConfig, StaticDiscovery};
use drplane_agent::{
    CancellationToken, Driver, SimConfig, SimDriver, SimNetwork, VolumeKind, VolumeSpec,
};
use drplane_api::auth::huawei::{Signer, SigningRequest};
use drplane_statemachine::inventory::{Disk, Flavor, Server, ServerStatus, Workload};
use reqwest::Method;
use serde_json::{json, Value};

use crate::bench::median;
use crate::cli::{render_table, Output};
use crate::dev::{local_specs, LocalCluster, READY_TIMEOUT, STOP_GRACE};

const MIB: u64 = 1 << 20;
const SITE_A: &str = "sdrs-a";
const SITE_B: &str = "sdrs-b";
/// The SDRS limit of protected instances per group.
const INSTANCES_MAX: usize = 100;

/// Which group operation a trial times.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdrsOp {
    /// Planned failover (SDRS-PG-REVERSE), back and forth.
    Reverse,
    /// Unplanned failover (SDRS-PG-FAILOVER), re-protected (untimed) after each.
    Failover,
    /// A reverse, then a failover, per trial.
    Both,
}

#[derive(clap::Args, Debug)]
pub struct SdrsFailoverArgs {
    /// Protected instances in the group (1 to 100, SDRS's limit per group).
    #[arg(long, default_value_t = 100)]
    pub instances: usize,
    /// Timed runs of each operation.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// The group operation(s) to time.
    #[arg(long, value_enum, default_value_t = SdrsOp::Both)]
    pub op: SdrsOp,
    /// Simulated hosts in each of the two sites.
    #[arg(long, default_value_t = 2)]
    pub hosts_per_site: usize,
    /// Time every simulated driver operation takes, in ms.
    #[arg(long, default_value_t = 1)]
    pub sim_latency_ms: u64,
    /// Size of each server's disk, in MiB.
    #[arg(long, default_value_t = 16)]
    pub disk_mib: u64,
    /// Interval between two polls of the job, in ms.
    #[arg(long, default_value_t = 20)]
    pub poll_ms: u64,
    /// Parent directory of the cluster's temporary data (default: the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Node i listens on HTTP port base+i and Raft port base+100+i.
    #[arg(long, default_value_t = 7900)]
    pub base_port: u16,
    /// Extra argument for every `drplane server` (repeatable).
    #[arg(long = "server-arg", allow_hyphen_values = true, value_name = "ARG")]
    pub server_args: Vec<String>,
    /// Keep the data directory and logs afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: SdrsFailoverArgs) -> anyhow::Result<()> {
    if args.instances == 0 || args.instances > INSTANCES_MAX {
        bail!("--instances must be from 1 to {INSTANCES_MAX} (SDRS's limit per group)");
    }
    if args.trials == 0 || args.hosts_per_site == 0 || args.poll_ms == 0 || args.disk_mib == 0 {
        bail!("--trials, --hosts-per-site, --poll-ms and --disk-mib must be positive");
    }
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!(
        "drplane-bench-sdrs-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let specs = local_specs(&dir, args.base_port)?;
    let mut cluster = LocalCluster::new(specs, args.server_args.clone())?;
    let shutdown = CancellationToken::new();
    let outcome = tokio::select! {
        r = measure(&mut cluster, &args, &dir, shutdown.clone()) => r,
        sig = crate::dev::shutdown_signal() => Err(anyhow!("{sig} received: stopped early")),
    };
    shutdown.cancel();
    cluster.stop_all(STOP_GRACE).await;
    if outcome.is_ok() && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "drplane bench: data and node logs kept in {}",
            dir.display()
        );
    }
    let report = outcome?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_table(&report),
    }
    Ok(())
}

fn print_table(report: &Value) {
    let headers = [
        "op",
        "trial",
        "total_ms",
        "agent_ms",
        "control_plane_ms",
        "api_call_ms",
        "first_task_ms",
        "tail_ms",
        "tasks",
        "task_ms_sum",
    ];
    let rows: Vec<Vec<String>> = report["trials"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            headers
                .iter()
                .map(|h| match &t[*h] {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                })
                .collect()
        })
        .collect();
    println!("{}", render_table(&headers, &rows));
    for (op, m) in report["median"].as_object().into_iter().flatten() {
        println!(
            "median {op:<8} total {} ms = agent {} ms + control plane {} ms (target: control plane < 2000 ms)",
            m["total_ms"], m["agent_ms"], m["control_plane_ms"]
        );
    }
    for (k, v) in report.as_object().into_iter().flatten() {
        if k != "trials" && k != "median" {
            println!("{k:<28} {v}");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The total length of the union of the intervals `[start, end)`, each clipped to
/// `[lo, hi)`: the time during which at least one of them was under way.
pub(crate) fn union_ms(intervals: &[(u64, u64)], lo: u64, hi: u64) -> u64 {
    let mut v: Vec<(u64, u64)> = intervals
        .iter()
        .map(|&(s, e)| (s.max(lo), e.min(hi)))
        .filter(|(s, e)| s < e)
        .collect();
    v.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(u64, u64)> = None;
    for (s, e) in v {
        cur = match cur {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = cur {
        total += ce - cs;
    }
    total
}

/// A native admin call; (status, JSON body).
async fn admin(
    c: &LocalCluster,
    base: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let url = format!("{base}{path}");
    let mut req = c.http().request(method.clone(), &url);
    if let Some(t) = c.token() {
        req = req.header("X-Auth-Token", t);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

async fn admin_ok(
    c: &LocalCluster,
    base: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let (s, v) = admin(c, base, method.clone(), path, body).await?;
    if !(200..300).contains(&s) {
        bail!("{method} {path}: {s} {v}");
    }
    Ok(v)
}

/// A Huawei SDK-like client: requests signed with the AK/SK of a project member.
struct Hw {
    http: reqwest::Client,
    /// `host:port` of the node every call goes to.
    node: String,
    project: String,
    ak: String,
    sk: String,
}

impl Hw {
    /// A signed call to `/v1/{project_id}{path}`; (status, JSON body).
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = match body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        let req = SigningRequest {
            method: method.as_str().to_string(),
            resource_path: format!("/v1/{}{path}", self.project),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            headers: vec![
                (
                    "Content-Type".into(),
                    "application/json;charset=UTF-8".into(),
                ),
                ("X-Project-Id".into(), self.project.clone()),
            ],
            host: self.node.clone(),
            body: body.clone(),
        };
        let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
        let signed = Signer {
            access_key: &self.ak,
            secret_key: &self.sk,
        }
        .sign(&req, unix);
        let url = format!("http://{}{}", self.node, signed.uri);
        let mut r = self.http.request(method.clone(), &url).body(body);
        for (k, v) in &signed.headers {
            r = r.header(k.as_str(), v.as_str());
        }
        let resp = r.send().await.with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn ok(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (s, v) = self.call(method.clone(), path, query, body).await?;
        if s != 200 {
            bail!("{method} /v1/…{path}: {s} {v}");
        }
        Ok(v)
    }

    /// An asynchronous SDRS call: its job id.
    async fn start_job(&self, path: &str, body: &Value) -> anyhow::Result<String> {
        let v = self.ok(Method::POST, path, &[], Some(body)).await?;
        v["job_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("POST {path}: no job_id in {v}"))
    }

    /// Polls the job every `poll` until it ends; the job and when its end was seen.
    async fn wait_job(
        &self,
        id: &str,
        poll: Duration,
        timeout: Duration,
    ) -> anyhow::Result<(Value, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let (s, v) = self
                .call(Method::GET, &format!("/jobs/{id}"), &[], None)
                .await?;
            let seen = Instant::now();
            if s == 200 && (v["status"] == "SUCCESS" || v["status"] == "FAIL") {
                return Ok((v, seen));
            }
            if seen > deadline {
                bail!("job {id} not ended after {timeout:?}: {s} {v}");
            }
            tokio::time::sleep(poll).await;
        }
    }

    async fn wait_success(&self, id: &str, timeout: Duration) -> anyhow::Result<Value> {
        let (v, _) = self
            .wait_job(id, Duration::from_millis(200), timeout)
            .await?;
        if v["status"] != "SUCCESS" {
            bail!("job {id} failed: {v}");
        }
        Ok(v)
    }
}

/// One timed group operation.
struct Trial {
    op: &'static str,
    n: usize,
    total_ms: f64,
    agent_ms: u64,
    api_call_ms: f64,
    first_task_ms: Option<u64>,
    tail_ms: Option<u64>,
    tasks: usize,
    task_ms_sum: u64,
}

impl Trial {
    fn control_plane_ms(&self) -> f64 {
        (self.total_ms - self.agent_ms as f64).max(0.0)
    }

    fn json(&self) -> Value {
        json!({
            "op": self.op,
            "trial": self.n,
            "total_ms": round1(self.total_ms),
            "agent_ms": self.agent_ms,
            "control_plane_ms": round1(self.control_plane_ms()),
            "api_call_ms": round1(self.api_call_ms),
            "first_task_ms": self.first_task_ms,
            "tail_ms": self.tail_ms,
            "tasks": self.tasks,
            "task_ms_sum": self.task_ms_sum,
        })
    }
}

fn report_trial(t: &Trial) {
    eprintln!(
        "trial {} {}: total {:.1} ms, agent {} ms, control plane {:.1} ms",
        t.n,
        t.op,
        t.total_ms,
        t.agent_ms,
        t.control_plane_ms()
    );
}

/// Times one group action (`body`) of `group`: see the module documentation.
async fn timed(
    hw: &Hw,
    group: &str,
    op: &'static str,
    n: usize,
    body: &Value,
    poll: Duration,
    state_dirs: &[PathBuf],
) -> anyhow::Result<Trial> {
    let wall0 = now_ms();
    let t0 = Instant::now();
    let job_id = hw
        .start_job(&format!("/server-groups/{group}/action"), body)
        .await?;
    let api_call_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (job, seen) = hw.wait_job(&job_id, poll, Duration::from_secs(600)).await?;
    let total_ms = seen.duration_since(t0).as_secs_f64() * 1000.0;
    let wall1 = now_ms();
    if job["status"] != "SUCCESS" {
        bail!("{op} job {job_id} failed: {job}");
    }
    let mut jobs: BTreeSet<String> = BTreeSet::from([job_id.clone()]);
    for s in job["entities"]["sub_jobs"].as_array().into_iter().flatten() {
        if let Some(id) = s["job_id"].as_str() {
            jobs.insert(id.to_string());
        }
    }
    let mut intervals = Vec::new();
    for d in state_dirs {
        for r in read_completions(&d.join("completions.jsonl"))? {
            if jobs.contains(&r.job_id) {
                intervals.push((r.started_at_ms, r.finished_at_ms.max(r.started_at_ms)));
            }
        }
    }
    let agent_ms = union_ms(&intervals, wall0, wall1);
    Ok(Trial {
        op,
        n,
        total_ms,
        agent_ms,
        api_call_ms,
        first_task_ms: intervals
            .iter()
            .map(|(s, _)| *s)
            .min()
            .map(|s| s.saturating_sub(wall0)),
        tail_ms: intervals
            .iter()
            .map(|(_, e)| *e)
            .max()
            .map(|e| wall1.saturating_sub(e)),
        tasks: intervals.len(),
        task_ms_sum: intervals.iter().map(|(s, e)| e - s).sum(),
    })
}

async fn measure(
    cluster: &mut LocalCluster,
    args: &SdrsFailoverArgs,
    dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<Value> {
    let setup_started = Instant::now();
    cluster.start_all().await?;
    cluster.form().await?;
    cluster.wait_ready_all(READY_TIMEOUT).await?;
    let (leader, _) = cluster.wait_agreed_leader(Duration::from_secs(10)).await?;
    let idx = cluster
        .index_of(leader)
        .ok_or_else(|| anyhow!("leader {leader} is not a local node"))?;
    let node = cluster.nodes[idx].spec.http.clone();
    let base = cluster.nodes[idx].spec.url();
    for site in [SITE_A, SITE_B] {
        let (s, v) = admin(
            cluster,
            &base,
            Method::POST,
            "/drplane/v1/sites",
            Some(&json!({"name": site})),
        )
        .await?;
        if s != 201 && s != 409 {
            bail!("creating site {site}: {s} {v}");
        }
    }

    // A project, a member user and its AK/SK.
    let p = admin_ok(
        cluster,
        &base,
        Method::POST,
        "/drplane/v1/identity/projects",
        Some(&json!({"name": "bench-sdrs"})),
    )
    .await?;
    let project = p["id"].as_str().context("project id")?.to_string();
    admin_ok(
        cluster,
        &base,
        Method::POST,
        "/drplane/v1/identity/users",
        Some(
            &json!({"name": "bench-sdrs-op", "project": "bench-sdrs", "role": "member",
                     "password": crate::dev_identity::random_password()}),
        ),
    )
    .await?;
    let k = admin_ok(
        cluster,
        &base,
        Method::POST,
        "/drplane/v1/identity/access-keys",
        Some(&json!({"user": "bench-sdrs-op"})),
    )
    .await?;
    let hw = Hw {
        http: cluster.http().clone(),
        node,
        project: project.clone(),
        ak: k["access_key"].as_str().context("access key")?.to_string(),
        sk: k["secret_key"].as_str().context("secret key")?.to_string(),
    };

    // The simulated hosts: production servers on the sdrs-a ones.
    let net = SimNetwork::new();
    let hps = args.hosts_per_site;
    let hosts: Vec<(String, &str)> = (0..hps)
        .map(|i| (format!("{SITE_A}-{i}"), SITE_A))
        .chain((0..hps).map(|i| (format!("{SITE_B}-{i}"), SITE_B)))
        .collect();
    let disk_bytes = args.disk_mib * MIB;
    let raft: Vec<String> = cluster.nodes.iter().map(|n| n.spec.raft.clone()).collect();
    let mut servers = Vec::new();
    let mut state_dirs = Vec::new();
    for (i, (host, site)) in hosts.iter().enumerate() {
        let driver = Arc::new(SimDriver::new(
            SimConfig {
                host: host.clone(),
                seed: i as u64 + 1,
                latency: Duration::from_millis(args.sim_latency_ms),
                ..SimConfig::default()
            },
            net.clone(),
        ));
        let mut workloads = Vec::new();
        if *site == SITE_A {
            for k in (i..args.instances).step_by(hps) {
                let (id, disk) = (format!("bench-vm-{k}"), format!("bench-vm-{k}-root"));
                driver
                    .create_volume(&VolumeSpec {
                        id: disk.clone(),
                        kind: VolumeKind::Disk,
                        pool: "default".into(),
                        size_bytes: disk_bytes,
                        reserve: false,
                        read_only: false,
                    })
                    .await
                    .with_context(|| format!("sim volume {disk}"))?;
                workloads.push(Workload::Server(Server {
                    id: id.clone(),
                    project: project.clone(),
                    name: id,
                    host: host.clone(),
                    // Stopped: a planned failover needs the production servers stopped.
                    status: ServerStatus::Shutoff,
                    flavor: Flavor {
                        vcpus: 1,
                        ram_mb: 256,
                    },
                    disks: vec![Disk {
                        path: format!("sim://{host}/{disk}"),
                        id: disk,
                        size_bytes: disk_bytes,
                        pool: "default".into(),
                    }],
                    created_at_ms: 0,
                    updated_at_ms: 0,
                }));
            }
        }
        let driver: Arc<dyn Driver> = driver;
        let server = driver
            .serve_sync_source("127.0.0.1:0".parse()?)
            .await
            .context("sim data service")?;
        let state_dir = dir.join("agents").join(host);
        let mut cfg = RuntimeConfig::new(host.clone(), *site, state_dir.clone());
        cfg.vcpus = 1024;
        cfg.ram_mb = 1 << 22;
        cfg.data_address = server.endpoint().to_string();
        cfg.workloads = workloads;
        servers.push(server);
        state_dirs.push(state_dir);
        let agent = Agent::new(cfg, driver, Arc::new(StaticDiscovery(raft.clone())))?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = agent.run(stop).await {
                tracing::warn!(error = %e, "sim agent stopped");
            }
        });
    }
    // Every host online, every server registered.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let h = admin_ok(cluster, &base, Method::GET, "/drplane/v1/hosts", None).await?;
        let online = h["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| {
                h["state"] == "online"
                    && h["name"]
                        .as_str()
                        .is_some_and(|n| hosts.iter().any(|(x, _)| x == n))
            })
            .count();
        let s = admin_ok(
            cluster,
            &base,
            Method::GET,
            &format!("/drplane/v1/servers?project={project}"),
            None,
        )
        .await?;
        let registered = s["servers"].as_array().map_or(0, Vec::len);
        if online == hosts.len() && registered >= args.instances {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after 120 s: {online} of {} hosts online, {registered} of {} servers registered",
                hosts.len(),
                args.instances
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The protection group and its instances, through the SDRS API.
    let domains = hw.ok(Method::GET, "/active-domains", &[], None).await?;
    let domain = domains["domains"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| {
            let zones: BTreeSet<&str> = [
                d["local_replication_cluster"]["availability_zone"].as_str(),
                d["remote_replication_cluster"]["availability_zone"].as_str(),
            ]
            .into_iter()
            .flatten()
            .collect();
            zones == BTreeSet::from([SITE_A, SITE_B])
        })
        .and_then(|d| d["id"].as_str())
        .ok_or_else(|| anyhow!("no active domain joins {SITE_A} and {SITE_B}: {domains}"))?
        .to_string();
    let job = hw
        .start_job(
            "/server-groups",
            &json!({"server_group": {"name": "bench-pg", "source_availability_zone": SITE_A,
                    "target_availability_zone": SITE_B, "domain_id": domain,
                    "source_vpc_id": "vpc-bench", "dr_type": "migration"}}),
        )
        .await?;
    let j = hw.wait_success(&job, Duration::from_secs(60)).await?;
    let group = j["entities"]["server_group_id"]
        .as_str()
        .context("group id")?
        .to_string();
    let mut create_jobs = Vec::new();
    for k in 0..args.instances {
        create_jobs.push(
            hw.start_job(
                "/protected-instances",
                &json!({"protected_instance": {"server_group_id": group,
                        "server_id": format!("bench-vm-{k}"), "name": format!("bench-pi-{k}")}}),
            )
            .await?,
        );
    }
    for job in &create_jobs {
        hw.wait_success(job, Duration::from_secs(600)).await?;
    }
    let job = hw
        .start_job(
            &format!("/server-groups/{group}/action"),
            &json!({"start-server-group": {}}),
        )
        .await?;
    hw.wait_success(&job, Duration::from_secs(600)).await?;
    let reps = hw
        .ok(
            Method::GET,
            "/replications",
            &[("server_group_id", &group)],
            None,
        )
        .await?;
    let reps = reps["replications"].as_array().cloned().unwrap_or_default();
    let synced = reps
        .iter()
        .filter(|r| r["status"] == "protected" && r["progress"] == 100)
        .count();
    if reps.len() != args.instances || synced != args.instances {
        bail!(
            "{synced} of {} pairs protected and synced ({} instances)",
            reps.len(),
            args.instances
        );
    }
    let setup_s = setup_started.elapsed().as_secs_f64();

    // The trials.
    let poll = Duration::from_millis(args.poll_ms);
    let mut station = "source";
    let mut trials: Vec<Trial> = Vec::new();
    for n in 1..=args.trials {
        if matches!(args.op, SdrsOp::Reverse | SdrsOp::Both) {
            let to = if station == "source" {
                "target"
            } else {
                "source"
            };
            let body = json!({"reverse-server-group": {"priority_station": to}});
            let t = timed(&hw, &group, "reverse", n, &body, poll, &state_dirs).await?;
            station = to;
            report_trial(&t);
            trials.push(t);
        }
        if matches!(args.op, SdrsOp::Failover | SdrsOp::Both) {
            let body = json!({"failover-server-group": {}});
            let t = timed(&hw, &group, "failover", n, &body, poll, &state_dirs).await?;
            station = if station == "source" {
                "target"
            } else {
                "source"
            };
            report_trial(&t);
            trials.push(t);
            // Re-protect (not timed) for the next trial.
            let job = hw
                .start_job(
                    &format!("/server-groups/{group}/action"),
                    &json!({"start-server-group": {}}),
                )
                .await?;
            hw.wait_success(&job, Duration::from_secs(600)).await?;
        }
    }
    let g = hw
        .ok(Method::GET, &format!("/server-groups/{group}"), &[], None)
        .await?;
    if g["server_group"]["priority_station"] != station {
        bail!(
            "the group ended at {} instead of {station}: {g}",
            g["server_group"]
        );
    }

    let mut medians = serde_json::Map::new();
    let ops: BTreeMap<&str, Vec<&Trial>> = trials.iter().fold(BTreeMap::new(), |mut m, t| {
        m.entry(t.op).or_insert_with(Vec::new).push(t);
        m
    });
    for (op, ts) in &ops {
        let m = |f: &dyn Fn(&Trial) -> f64| {
            round1(median(&ts.iter().map(|t| f(t)).collect::<Vec<_>>()))
        };
        medians.insert(
            op.to_string(),
            json!({
                "total_ms": m(&|t| t.total_ms),
                "agent_ms": m(&|t| t.agent_ms as f64),
                "control_plane_ms": m(&|t| t.control_plane_ms()),
                "tasks": m(&|t| t.tasks as f64),
            }),
        );
    }
    drop(servers);
    let fsync = crate::bench::fsync_probe_ms(dir).ok();
    Ok(json!({
        "trials": trials.iter().map(Trial::json).collect::<Vec<_>>(),
        "median": medians,
        "instances": args.instances,
        "hosts_per_site": hps,
        "sim_latency_ms": args.sim_latency_ms,
        "poll_ms": args.poll_ms,
        "setup_s": round1(setup_s),
        "fsync_p50_ms": fsync,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_counts_overlaps_once_and_clips_to_the_window() {
        assert_eq!(union_ms(&[], 0, 100), 0);
        // Disjoint, overlapping, nested, touching.
        let v = [(10, 20), (15, 30), (16, 18), (30, 35), (50, 60)];
        assert_eq!(union_ms(&v, 0, 100), 25 + 10);
        // Unsorted input, the same answer.
        let w = [(50, 60), (30, 35), (10, 20), (16, 18), (15, 30)];
        assert_eq!(union_ms(&w, 0, 100), 35);
        // Clipped: only [12, 55) counts.
        assert_eq!(union_ms(&v, 12, 55), 18 + 5 + 5);
        // Empty and inverted intervals count nothing.
        assert_eq!(union_ms(&[(5, 5), (9, 3)], 0, 100), 0);
        // Entirely outside the window.
        assert_eq!(union_ms(&[(1, 4)], 10, 20), 0);
    }
}
