//! Chaos runs: a cluster in private network namespaces, the concurrent [`workload`], a
//! nemesis injecting one fault at a time from a seeded schedule, then healing and the
//! checkers:
//!
//! - **linearizable**: the history, with final reads through every member, per key
//!   ([`crate::linearizability`]);
//! - **no acknowledged write lost**: each key's final state is the effect of a write that no
//!   acknowledged write followed (stated plainly, beside the search);
//! - **identical state**: once every member reports the same applied index, every member's
//!   stale listing of sites is the same;
//! - **recovers**: after each fault is healed the cluster elects a leader, every member is
//!   ready and the clients get acknowledgements again.
//!
//! A run that finds a violation (or fails) saves its history, seed, fault log and the node
//! logs under [`artifacts_root`] and prints where; the same seed replays the same schedule.
//!
//! [`workload`]: crate::workload

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use crate::history::{Call, Counts, History, Op, Outcome, Ret};
use crate::linearizability;
use crate::workload::{self, Endpoints, Workload, WorkloadConfig};
use crate::{cli, Cluster};

/// Node flags of chaos clusters: the timing the other real-process tests use (the product's
/// defaults elect faster than two busy cores running debug builds can keep up with), and a
/// request deadline shorter than the clients' attempt timeout so that the cluster, not the
/// client, says when it cannot answer.
pub const CHAOS_NODE_ARGS: &[&str] = &[
    "--heartbeat-ms",
    "60",
    "--election-min-ms",
    "300",
    "--election-max-ms",
    "600",
    "--request-timeout-ms",
    "2000",
];

/// The faults the nemesis knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// kill -9 the leader, restart it after the hold.
    KillLeader,
    /// kill -9 a random member, restart it after the hold.
    KillRandom,
    /// SIGSTOP the leader, SIGCONT after the hold.
    PauseLeader,
    /// SIGSTOP a random member, SIGCONT after the hold.
    PauseRandom,
    /// Cut the leader off from every other member, both directions.
    IsolateLeader,
    /// Split the members into a minority and a majority.
    MajorityMinority,
    /// Two halves that cannot talk to each other, and one node that talks to both.
    Bridge,
    /// Cut one direction only: the leader to the others, or the others to the leader.
    OneWayCut,
    /// Every link to and from a random member slowed to 64 kbit/s with a short queue.
    SlowLink,
    /// Fill the small disk of the member that has one; free it after the hold.
    DiskFull,
    /// kill -9 every node of one 2-node site at once (5 nodes in 2-2-1), restart later.
    SiteLoss,
    /// Add a node (learner, then voter) through the CLI; the next time remove it again.
    MembershipChange,
    /// kill -9 a random agent while its tasks run, restart it after the hold (runs with
    /// agents only).
    KillAgent,
}

impl Fault {
    pub const ALL: &'static [Fault] = &[
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::PauseLeader,
        Fault::PauseRandom,
        Fault::IsolateLeader,
        Fault::MajorityMinority,
        Fault::Bridge,
        Fault::OneWayCut,
        Fault::SlowLink,
        Fault::DiskFull,
        Fault::SiteLoss,
        Fault::MembershipChange,
        Fault::KillAgent,
    ];

    /// The fault named `name` (as [`Fault::name`] spells it).
    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.iter().copied().find(|f| f.name() == name.trim())
    }

    /// A comma-separated list of fault names.
    pub fn parse_list(list: &str) -> anyhow::Result<Vec<Fault>> {
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| Fault::parse(s).ok_or_else(|| anyhow!("unknown fault {s:?}")))
            .collect()
    }

    pub fn name(&self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillRandom => "kill-random",
            Fault::PauseLeader => "pause-leader",
            Fault::PauseRandom => "pause-random",
            Fault::IsolateLeader => "isolate-leader",
            Fault::MajorityMinority => "majority-minority",
            Fault::Bridge => "bridge",
            Fault::OneWayCut => "one-way-cut",
            Fault::SlowLink => "slow-link",
            Fault::DiskFull => "disk-full",
            Fault::SiteLoss => "site-loss",
            Fault::MembershipChange => "membership-change",
            Fault::KillAgent => "kill-agent",
        }
    }
}

/// The cluster's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Topology {
    /// 3 nodes in 3 sites.
    ThreeSites,
    /// 5 nodes in 3 sites laid out 2-2-1 (nodes 1-2 site-a, 3-4 site-b, 5 site-c).
    FiveNodes221,
}

impl Topology {
    /// `ThreeSites` or `FiveNodes221` (also `3` and `5`).
    pub fn parse(s: &str) -> Option<Topology> {
        match s.trim() {
            "ThreeSites" | "3" => Some(Topology::ThreeSites),
            "FiveNodes221" | "5" => Some(Topology::FiveNodes221),
            _ => None,
        }
    }

    pub fn sites(&self) -> &'static [&'static str] {
        match self {
            Topology::ThreeSites => &["site-a", "site-b", "site-c"],
            Topology::FiveNodes221 => &["site-a", "site-a", "site-b", "site-b", "site-c"],
        }
    }
}

/// How the nemesis picks faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every listed fault once in a seeded order, then again, while time remains.
    Cycle,
    /// A seeded random pick each time.
    Random,
}

/// One chaos run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub name: String,
    pub seed: u64,
    pub topology: Topology,
    /// How long faults are injected (the run takes longer: start, heal, checks).
    pub duration: Duration,
    pub faults: Vec<Fault>,
    pub schedule: Schedule,
    /// How long a fault is held, drawn in this range (ms).
    pub hold_ms: (u64, u64),
    pub workload: WorkloadConfig,
    /// Run two `sim` agents (h1 in site-a, h2 in site-b) and a client creating a job of
    /// dependent tasks about every second; at the end every acknowledged job must end
    /// SUCCESS or FAIL.
    pub agents: bool,
    /// The command that runs this run again (written to `seed.txt` of a failure); by
    /// default the long profile's `replay` test with this seed, faults and topology.
    pub replay: Option<String>,
}

impl RunConfig {
    pub fn new(name: &str, seed: u64, topology: Topology, duration: Duration) -> RunConfig {
        RunConfig {
            name: name.to_string(),
            seed,
            topology,
            duration,
            faults: Fault::ALL.to_vec(),
            schedule: Schedule::Random,
            hold_ms: (1000, 3000),
            workload: WorkloadConfig {
                seed,
                key_prefix: format!("s{seed}"),
                ..WorkloadConfig::default()
            },
            replay: None,
            agents: false,
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunResult {
    pub name: String,
    pub seed: u64,
    pub faults: BTreeMap<String, u64>,
    /// Faults that could not be injected as planned (not violations; e.g. a CLI call
    /// refused during an election), with why.
    pub fault_errors: Vec<String>,
    pub ops: Counts,
    pub keys: usize,
    /// Keys whose history is not linearizable, with the explanation.
    pub not_linearizable: BTreeMap<String, String>,
    /// Keys whose search ran out of budget.
    pub inconclusive: Vec<String>,
    /// Acknowledged writes whose effect is missing at the end.
    pub lost_writes: Vec<String>,
    /// Members whose final state differs, or never caught up.
    pub divergence: Vec<String>,
    /// The cluster did not recover after a fault was healed.
    pub liveness: Vec<String>,
    /// Acknowledged jobs that did not end SUCCESS or FAIL after healing.
    pub unfinished_jobs: Vec<String>,
    /// Jobs acknowledged (201) during the run, and how many ended SUCCESS.
    pub jobs: u64,
    pub jobs_succeeded: u64,
    /// What the nemesis did, with the time since the workload started.
    pub log: Vec<String>,
    /// Where the failure's evidence was saved.
    pub artifacts: Option<PathBuf>,
}

impl RunResult {
    pub fn violations(&self) -> usize {
        self.not_linearizable.len()
            + self.lost_writes.len()
            + self.divergence.len()
            + self.liveness.len()
            + self.unfinished_jobs.len()
    }

    /// One paragraph for the test output.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "run {} seed {}: {} ops ({} ok, {} failed, {} unknown) on {} keys; faults {:?}; \
             violations {} (not linearizable {}, lost writes {}, divergence {}, liveness {}, \
             unfinished jobs {}); inconclusive keys {}; jobs {} ({} SUCCESS)",
            self.name,
            self.seed,
            self.ops.total(),
            self.ops.ok,
            self.ops.failed,
            self.ops.unknown,
            self.keys,
            self.faults,
            self.violations(),
            self.not_linearizable.len(),
            self.lost_writes.len(),
            self.divergence.len(),
            self.liveness.len(),
            self.unfinished_jobs.len(),
            self.inconclusive.len(),
            self.jobs,
            self.jobs_succeeded
        );
        for (k, v) in &self.not_linearizable {
            s.push_str(&format!("\n  key {k}: {v}"));
        }
        for v in self
            .lost_writes
            .iter()
            .chain(&self.divergence)
            .chain(&self.liveness)
            .chain(&self.unfinished_jobs)
        {
            s.push_str(&format!("\n  {v}"));
        }
        for e in &self.fault_errors {
            s.push_str(&format!("\n  (fault not as planned: {e})"));
        }
        if let Some(a) = &self.artifacts {
            s.push_str(&format!("\n  evidence saved in {}", a.display()));
        }
        s
    }
}

/// Where failing runs save their evidence: `$CHAOS_ARTIFACTS_DIR`, or
/// `<tmp>/drplane-chaos`.
pub fn artifacts_root() -> PathBuf {
    std::env::var_os("CHAOS_ARTIFACTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("drplane-chaos"))
}

/// The state of a run the nemesis works on.
struct Run {
    c: Cluster,
    members: BTreeSet<u64>,
    endpoints: Endpoints,
    rng: rand::rngs::StdRng,
    result: RunResult,
    /// The node with a small disk, if any.
    small_disk: Option<u64>,
    /// A node added by MembershipChange that is a member now.
    extra: Option<u64>,
    next_id: u64,
    clock: Instant,
}

impl Run {
    fn note(&mut self, what: String) {
        let line = format!("{:>8.3}s {what}", self.clock.elapsed().as_secs_f64());
        eprintln!("[{}] {line}", self.result.name);
        self.result.log.push(line);
    }

    fn refresh_endpoints(&mut self) {
        let eps: Vec<(u64, String)> = self
            .members
            .iter()
            .map(|id| (*id, self.c.url(*id)))
            .collect();
        if let Ok(mut e) = self.endpoints.write() {
            *e = eps;
        }
    }

    fn pick_member(&mut self) -> u64 {
        let m: Vec<u64> = self.members.iter().copied().collect();
        m[self.rng.gen_range(0..m.len())]
    }

    async fn leader(&mut self) -> u64 {
        match self.c.wait_leader(Duration::from_secs(5)).await {
            Ok(l) if self.members.contains(&l) => l,
            _ => self.pick_member(),
        }
    }

    fn net(&mut self) -> anyhow::Result<&mut crate::net::Net> {
        self.c
            .net
            .as_mut()
            .ok_or_else(|| anyhow!("the cluster has no private network"))
    }

    async fn hold(&mut self, cfg: &RunConfig) {
        let ms = self
            .rng
            .gen_range(cfg.hold_ms.0..=cfg.hold_ms.1.max(cfg.hold_ms.0));
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Inject `fault`, hold it, heal it. Errors are the harness's (not violations).
    async fn inject(&mut self, fault: Fault, cfg: &RunConfig) -> anyhow::Result<bool> {
        match fault {
            Fault::KillLeader | Fault::KillRandom => {
                let victim = if fault == Fault::KillLeader {
                    self.leader().await
                } else {
                    self.pick_member()
                };
                self.note(format!("{}: kill -9 node {victim}", fault.name()));
                self.c.kill(victim)?;
                self.hold(cfg).await;
                self.note(format!("restart node {victim}"));
                self.c.restart(victim)?;
            }
            Fault::PauseLeader | Fault::PauseRandom => {
                let victim = if fault == Fault::PauseLeader {
                    self.leader().await
                } else {
                    self.pick_member()
                };
                self.note(format!("{}: SIGSTOP node {victim}", fault.name()));
                self.c.pause(victim)?;
                self.hold(cfg).await;
                self.note(format!("SIGCONT node {victim}"));
                self.c.resume(victim)?;
            }
            Fault::IsolateLeader => {
                let l = self.leader().await;
                let others: Vec<u64> = self.members.iter().copied().filter(|m| *m != l).collect();
                self.note(format!("isolate leader {l} from {others:?}"));
                self.net()?.partition(&[l], &others)?;
                self.hold(cfg).await;
                self.note("heal".into());
                self.net()?.heal()?;
            }
            Fault::MajorityMinority => {
                let mut m: Vec<u64> = self.members.iter().copied().collect();
                m.shuffle(&mut self.rng);
                let minority = (m.len() - 1) / 2;
                let (a, b) = m.split_at(minority.max(1));
                let (a, b) = (a.to_vec(), b.to_vec());
                self.note(format!("partition minority {a:?} | majority {b:?}"));
                self.net()?.partition(&a, &b)?;
                self.hold(cfg).await;
                self.note("heal".into());
                self.net()?.heal()?;
            }
            Fault::Bridge => {
                let mut m: Vec<u64> = self.members.iter().copied().collect();
                m.shuffle(&mut self.rng);
                let bridge = m[0];
                let half = (m.len() - 1) / 2;
                let a = m[1..1 + half].to_vec();
                let b = m[1 + half..].to_vec();
                self.note(format!(
                    "bridge partition {a:?} | {b:?}, node {bridge} sees both"
                ));
                self.net()?.partition(&a, &b)?;
                self.hold(cfg).await;
                self.note("heal".into());
                self.net()?.heal()?;
            }
            Fault::OneWayCut => {
                let l = self.leader().await;
                let others: Vec<u64> = self.members.iter().copied().filter(|m| *m != l).collect();
                let outbound = self.rng.gen_bool(0.5);
                if outbound {
                    self.note(format!("one-way cut: leader {l} -> {others:?} dropped"));
                } else {
                    self.note(format!("one-way cut: {others:?} -> leader {l} dropped"));
                }
                for o in &others {
                    let (from, to) = if outbound { (l, *o) } else { (*o, l) };
                    self.net()?.cut(from, to)?;
                }
                self.hold(cfg).await;
                self.note("heal".into());
                self.net()?.heal()?;
            }
            Fault::SlowLink => {
                let x = self.pick_member();
                let others: Vec<u64> = self.members.iter().copied().filter(|m| *m != x).collect();
                self.note(format!("slow links to and from node {x}: 64 kbit/s"));
                for o in others {
                    self.net()?.set_slow(x, o, Some(64))?;
                    self.net()?.set_slow(o, x, Some(64))?;
                }
                self.hold(cfg).await;
                self.note("heal".into());
                self.net()?.heal()?;
            }
            Fault::DiskFull => {
                let Some(id) = self.small_disk.filter(|id| self.members.contains(id)) else {
                    return Ok(false);
                };
                let bytes = self.c.fill_disk(id)?;
                self.note(format!(
                    "disk-full: node {id}'s disk filled ({} MiB of ballast)",
                    bytes >> 20
                ));
                self.hold(cfg).await;
                self.c.free_disk(id)?;
                if self.c.is_running(id) {
                    self.note(format!("disk of node {id} freed; it kept running"));
                } else {
                    self.note(format!("disk of node {id} freed; it had exited: restart"));
                    self.c.restart(id)?;
                }
            }
            Fault::SiteLoss => {
                if cfg.topology != Topology::FiveNodes221 {
                    return Ok(false);
                }
                let site = if self.rng.gen_bool(0.5) {
                    "site-a"
                } else {
                    "site-b"
                };
                let victims: Vec<u64> = self
                    .members
                    .iter()
                    .copied()
                    .filter(|id| self.c.spec(*id).map(|s| s.site == site).unwrap_or(false))
                    .collect();
                self.note(format!(
                    "site-loss: {site} (nodes {victims:?}) killed at once"
                ));
                for v in &victims {
                    self.c.kill(*v)?;
                }
                self.hold(cfg).await;
                self.note(format!("restart {victims:?}"));
                for v in &victims {
                    self.c.restart(*v)?;
                }
            }
            Fault::MembershipChange => self.membership_change().await?,
            Fault::KillAgent => {
                let hosts: Vec<String> = self.c.agents.keys().cloned().collect();
                if hosts.is_empty() {
                    return Ok(false);
                }
                let host = hosts[self.rng.gen_range(0..hosts.len())].clone();
                self.note(format!("kill-agent: kill -9 agent {host}"));
                self.c.kill_agent(&host)?;
                self.hold(cfg).await;
                self.note(format!("restart agent {host}"));
                self.c.restart_agent(&host)?;
            }
        }
        Ok(true)
    }

    async fn membership_change(&mut self) -> anyhow::Result<()> {
        let via = self.leader().await;
        let endpoint = self.c.url(via);
        if let Some(id) = self.extra {
            self.note(format!("membership: demote and remove node {id} via {via}"));
            self.members.remove(&id);
            self.refresh_endpoints();
            let id_s = id.to_string();
            cli_retry(&["cluster", "demote", "--endpoint", &endpoint, "--id", &id_s]).await?;
            cli_retry(&["cluster", "remove", "--endpoint", &endpoint, "--id", &id_s]).await?;
            self.c.kill(id)?;
            self.extra = None;
            self.note(format!("node {id} removed and stopped"));
        } else {
            let id = self.next_id;
            self.next_id += 1;
            let site = match self.c.nodes.len() {
                n if n < 5 => "site-d",
                _ => "site-c",
            };
            self.note(format!("membership: add node {id} in {site} via {via}"));
            self.c.spawn_new(id, site)?;
            self.c.wait_live(id, Duration::from_secs(30)).await?;
            let spec = self.c.spec(id)?.clone();
            let id_s = id.to_string();
            cli_retry(&[
                "cluster",
                "add",
                "--endpoint",
                &endpoint,
                "--id",
                &id_s,
                "--site",
                site,
                "--http",
                &spec.http,
                "--raft",
                &spec.raft,
            ])
            .await?;
            self.extra = Some(id);
            cli_retry(&["cluster", "promote", "--endpoint", &endpoint, "--id", &id_s]).await?;
            self.members.insert(id);
            self.refresh_endpoints();
            self.note(format!("node {id} is a voter"));
        }
        Ok(())
    }

    /// Wait until the members agree on a leader and are all ready.
    async fn wait_recovered(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        self.c.wait_leader(timeout).await?;
        for id in self.members.clone() {
            let left = deadline.saturating_duration_since(Instant::now());
            self.c
                .wait_ready(id, left.max(Duration::from_secs(1)))
                .await?;
        }
        Ok(())
    }

    /// Undo everything: resume, heal the network, free the disk, restart dead members.
    fn heal_all(&mut self) -> anyhow::Result<()> {
        for id in self.members.clone() {
            if self.c.is_running(id) {
                let _ = self.c.resume(id);
            }
        }
        if let Some(net) = self.c.net.as_mut() {
            net.heal()?;
        }
        if let Some(id) = self.small_disk {
            let _ = self.c.free_disk(id);
        }
        for id in self.members.clone() {
            if !self.c.is_running(id) {
                self.c.restart(id)?;
            }
        }
        for host in self.c.agents.keys().cloned().collect::<Vec<_>>() {
            if !self.c.is_agent_running(&host) {
                self.c.restart_agent(&host)?;
            }
        }
        Ok(())
    }
}

/// Run the CLI (as admin) off the async threads, retrying a refused call a few times.
async fn cli_retry(args: &[&str]) -> anyhow::Result<String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut last = String::new();
    for _ in 0..5 {
        let a = args.clone();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            cli(&refs)
        })
        .await??;
        if ok {
            return Ok(out);
        }
        last = format!("{out}{err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("drplane {}: {last}", args.join(" "))
}

/// Start a cluster for `cfg`, run it, check it, and save evidence if anything failed.
pub async fn run(cfg: RunConfig) -> anyhow::Result<RunResult> {
    eprintln!(
        "chaos run {} seed {} ({:?}, {:?} of faults: {})",
        cfg.name,
        cfg.seed,
        cfg.topology,
        cfg.duration,
        cfg.faults
            .iter()
            .map(Fault::name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let sites = cfg.topology.sites();
    let small_disk = cfg
        .faults
        .contains(&Fault::DiskFull)
        .then_some(sites.len() as u64);
    let disks: Vec<(u64, u64)> = small_disk.iter().map(|id| (*id, 256)).collect();
    let mut args: Vec<&str> = CHAOS_NODE_ARGS.to_vec();
    if cfg.agents {
        // Losses of agents and leaders noticed within seconds.
        args.extend(["--task-lease-ms", "3000", "--host-offline-after-ms", "3000"]);
    }
    let mut c = Cluster::start_in_net(sites, &args, &disks).await?;
    if cfg.agents {
        c.spawn_agent("h1", "site-a", "sim")?;
        c.spawn_agent("h2", "site-b", "sim")?;
        c.wait_hosts_state(&["h1", "h2"], "online", Duration::from_secs(30))
            .await?;
    }
    let members: BTreeSet<u64> = c.ids().into_iter().collect();
    let mut run = Run {
        next_id: members.len() as u64 + 1,
        c,
        members,
        endpoints: Arc::new(RwLock::new(Vec::new())),
        rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
        result: RunResult {
            name: cfg.name.clone(),
            seed: cfg.seed,
            ..RunResult::default()
        },
        small_disk,
        extra: None,
        clock: Instant::now(),
    };
    run.refresh_endpoints();
    let mut history = History::default();
    let outcome = drive(&mut run, &cfg, &mut history).await;
    let failed = match &outcome {
        Ok(()) => run.result.violations() > 0,
        Err(e) => {
            run.note(format!("run failed: {e:#}"));
            true
        }
    };
    if failed {
        match save_evidence(&run, &cfg, &history) {
            Ok(dir) => run.result.artifacts = Some(dir),
            Err(e) => eprintln!("could not save the evidence: {e:#}"),
        }
    }
    eprintln!("{}", run.result.describe());
    outcome.map(|()| run.result)
}

async fn drive(run: &mut Run, cfg: &RunConfig, history: &mut History) -> anyhow::Result<()> {
    let wl = Workload::start(
        run.c.http.clone(),
        run.endpoints.clone(),
        cfg.workload.clone(),
    );
    run.clock = wl.started;
    let jobs = cfg
        .agents
        .then(|| JobClient::start(run.c.http.clone(), run.endpoints.clone(), cfg.seed));
    // A moment of normal operation first.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut order: Vec<Fault> = Vec::new();
    let end = Instant::now() + cfg.duration;
    while Instant::now() < end {
        if cfg.faults.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let fault = match cfg.schedule {
            Schedule::Random => cfg.faults[run.rng.gen_range(0..cfg.faults.len())],
            Schedule::Cycle => {
                if order.is_empty() {
                    order = cfg.faults.clone();
                    order.shuffle(&mut run.rng);
                    order.reverse();
                }
                order.pop().unwrap_or(Fault::KillRandom)
            }
        };
        match run.inject(fault, cfg).await {
            Ok(true) => {
                *run.result.faults.entry(fault.name().into()).or_default() += 1;
            }
            Ok(false) => continue,
            Err(e) => {
                run.note(format!("{}: not as planned: {e:#}", fault.name()));
                run.result
                    .fault_errors
                    .push(format!("{}: {e:#}", fault.name()));
                run.heal_all()?;
            }
        }
        // After healing: the cluster must recover and acknowledge again.
        let acked = wl.acknowledged.load(std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = run.wait_recovered(Duration::from_secs(30)).await {
            let v = format!(
                "liveness: not recovered 30 s after healing {}: {e:#}",
                fault.name()
            );
            run.note(v.clone());
            run.result.liveness.push(v);
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while wl.acknowledged.load(std::sync::atomic::Ordering::Relaxed) == acked {
            if Instant::now() > deadline {
                let v = format!(
                    "liveness: no operation acknowledged within 15 s after healing {}",
                    fault.name()
                );
                run.note(v.clone());
                run.result.liveness.push(v);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let quiet = run.rng.gen_range(300..1000);
        tokio::time::sleep(Duration::from_millis(quiet)).await;
    }
    let keys = wl.keys();
    let started = wl.started;
    let mut ops = wl.stop().await?;
    let job_ids = match jobs {
        Some(j) => j.stop().await?,
        None => Vec::new(),
    };
    run.note(format!("workload stopped after {} operations", ops.len()));
    run.heal_all()?;
    run.wait_recovered(Duration::from_secs(60))
        .await
        .context("recovering after the final heal")?;

    // Every member's state identical, once they applied the same prefix.
    let final_state = converged_state(run).await?;
    // Final linearizable reads of every key through every member, in the history.
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0xf1a1);
    for id in run.members.clone() {
        let only: Endpoints = Arc::new(RwLock::new(vec![(id, run.c.url(id))]));
        for key in &keys {
            let op = workload::run_op(
                &run.c.http,
                &only,
                &cfg.workload,
                started,
                &mut rng,
                1000 + id as usize,
                key,
                Call::Read,
                "final-read",
            )
            .await;
            if !matches!(op.outcome, Outcome::Ok(_)) {
                run.result.liveness.push(format!(
                    "final read of {key} through healed node {id} failed: {:?}",
                    op.outcome
                ));
            }
            ops.push(op);
        }
    }
    *history = History::from_ops(ops);
    run.result.ops = history.counts();
    run.result.keys = keys.len();
    let report = linearizability::check(history, linearizability::DEFAULT_BUDGET);
    run.result.not_linearizable = report.violations;
    run.result.inconclusive = report.inconclusive;
    run.result.lost_writes = lost_writes(history, &final_state);
    if !job_ids.is_empty() {
        check_jobs_end(run, &job_ids, Duration::from_secs(120)).await?;
    }
    Ok(())
}

/// A client creating a small job of dependent `sleep` tasks about every second through
/// random members; keeps the ids of the jobs the cluster acknowledged (201).
struct JobClient {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl JobClient {
    fn start(http: reqwest::Client, endpoints: Endpoints, seed: u64) -> JobClient {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x10b5);
            let mut ids = Vec::new();
            let mut n = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let target = endpoints
                    .read()
                    .ok()
                    .and_then(|e| (!e.is_empty()).then(|| e[rng.gen_range(0..e.len())].clone()));
                if let Some((_, url)) = target {
                    let body = serde_json::json!({"tasks": [
                        {"name": "a", "duration_ms": rng.gen_range(100..600)},
                        {"name": "b", "duration_ms": rng.gen_range(100..400), "depends_on": ["a"]},
                        {"name": "c", "duration_ms": rng.gen_range(100..400), "depends_on": ["a"]},
                    ]});
                    let r = http
                        .post(format!("{url}/drplane/v1/jobs"))
                        .header("Idempotency-Key", format!("job-{seed}-{n}"))
                        .timeout(Duration::from_secs(3))
                        .json(&body)
                        .send()
                        .await;
                    if let Ok(resp) = r {
                        if resp.status().as_u16() == 201 {
                            if let Ok(v) = resp.json::<Value>().await {
                                if let Some(id) = v["id"].as_str() {
                                    ids.push(id.to_string());
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1500))).await;
            }
            ids
        });
        JobClient { stop, task }
    }

    async fn stop(self) -> anyhow::Result<Vec<String>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// Every acknowledged job ends SUCCESS or FAIL within `timeout` after healing.
async fn check_jobs_end(run: &mut Run, ids: &[String], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let via: Vec<u64> = run.members.iter().copied().collect();
    let mut pending: Vec<String> = ids.to_vec();
    let mut succeeded = 0u64;
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for (i, id) in pending.iter().enumerate() {
            let node = via[i % via.len()];
            match run.c.get(node, &format!("/drplane/v1/jobs/{id}")).await {
                Ok(r) if r.status == 200 => {
                    let status = r.body["status"].as_str().unwrap_or("?").to_string();
                    match status.as_str() {
                        "SUCCESS" => succeeded += 1,
                        "FAIL" => {}
                        _ => {
                            last.insert(id.clone(), status);
                            still.push(id.clone());
                        }
                    }
                }
                Ok(r) => {
                    last.insert(id.clone(), format!("{} {}", r.status, r.text));
                    still.push(id.clone());
                }
                Err(e) => {
                    last.insert(id.clone(), e.to_string());
                    still.push(id.clone());
                }
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    run.result.jobs = ids.len() as u64;
    run.result.jobs_succeeded = succeeded;
    for id in &pending {
        run.result.unfinished_jobs.push(format!(
            "job {id} not ended {timeout:?} after healing: {}",
            last.get(id).map(String::as_str).unwrap_or("?")
        ));
    }
    run.note(format!(
        "{} of {} acknowledged jobs ended ({succeeded} SUCCESS)",
        ids.len() - pending.len(),
        ids.len()
    ));
    Ok(())
}

/// Wait until every member reports the same applied index, then compare their stale
/// listings; returns the sites (name -> description) they agree on. Differences are
/// recorded as divergence.
async fn converged_state(run: &mut Run) -> anyhow::Result<BTreeMap<String, String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = applied_indexes(run).await;
        if let Some(index) = agreed(&before) {
            let mut listings = BTreeMap::new();
            for id in run.members.clone() {
                let r = run.c.get(id, "/drplane/v1/sites?consistency=stale").await?;
                if r.status != 200 {
                    bail!("listing sites on {id}: {} {}", r.status, r.text);
                }
                listings.insert(id, r.body["sites"].clone());
            }
            let after = applied_indexes(run).await;
            if agreed(&after) == Some(index) {
                let mut distinct: Vec<(&u64, &Value)> = Vec::new();
                for (id, l) in &listings {
                    if !distinct.iter().any(|(_, d)| *d == l) {
                        distinct.push((id, l));
                    }
                }
                if distinct.len() > 1 {
                    let desc: Vec<String> = listings
                        .iter()
                        .map(|(id, l)| format!("node {id}: {l}"))
                        .collect();
                    run.result.divergence.push(format!(
                        "members applied index {index} but hold different sites:\n    {}",
                        desc.join("\n    ")
                    ));
                }
                let (_, first) = distinct
                    .first()
                    .ok_or_else(|| anyhow!("no member listed its sites"))?;
                let sites = first
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| {
                                Some((
                                    s["name"].as_str()?.to_string(),
                                    s["description"].as_str().unwrap_or("").to_string(),
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                run.note(format!(
                    "all {} members applied index {index} and hold the same {} sites",
                    listings.len(),
                    listings
                        .values()
                        .next()
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len)
                ));
                return Ok(sites);
            }
        }
        let last_seen = format!("{before:?}");
        if Instant::now() > deadline {
            run.result.divergence.push(format!(
                "members never reported the same applied index within 30 s: {last_seen}"
            ));
            bail!("no convergence: {last_seen}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn applied_indexes(run: &Run) -> BTreeMap<u64, Option<u64>> {
    let mut m = BTreeMap::new();
    for id in &run.members {
        let v = match run
            .c
            .get(*id, "/drplane/v1/cluster?consistency=stale")
            .await
        {
            Ok(r) if r.status == 200 => r.body["applied_index"].as_u64(),
            _ => None,
        };
        m.insert(*id, v);
    }
    m
}

fn agreed(m: &BTreeMap<u64, Option<u64>>) -> Option<u64> {
    let first = (*m.values().next()?)?;
    m.values().all(|v| *v == Some(first)).then_some(first)
}

/// Each key's final state must be the effect of a write that no acknowledged write
/// followed: a create that made it (acknowledged `Created`, or unknown) or a delete that
/// removed it (acknowledged `Deleted`, or unknown); with no acknowledged such write, the key
/// may also be absent as it started.
pub fn lost_writes(history: &History, final_state: &BTreeMap<String, String>) -> Vec<String> {
    let mut lost = Vec::new();
    for (key, ops) in history.by_key() {
        let effective: Vec<&&Op> = ops
            .iter()
            .filter(|o| match (&o.call, &o.outcome) {
                (Call::Create { .. }, Outcome::Ok(Ret::Created))
                | (Call::Delete, Outcome::Ok(Ret::Deleted)) => true,
                (c, Outcome::Unknown { .. }) => c.is_write(),
                _ => false,
            })
            .collect();
        let acked = |o: &Op| matches!(o.outcome, Outcome::Ok(_));
        // Writes that no acknowledged effective write strictly followed.
        let last: Vec<&&Op> = effective
            .iter()
            .copied()
            .filter(|w| {
                let end = if acked(w) { w.complete_us } else { u64::MAX };
                !effective
                    .iter()
                    .any(|o| acked(o) && o.id != w.id && o.invoke_us > end)
            })
            .collect();
        let got = final_state.get(key);
        // With no acknowledged effective write, the unknown ones may all have failed: the
        // key may still be absent as it started.
        let none_acked = !effective.iter().any(|w| acked(w));
        let explained = (none_acked && got.is_none())
            || last.iter().any(|w| match (&w.call, got) {
                (Call::Create { description }, Some(d)) => description == d,
                (Call::Delete, None) => true,
                _ => false,
            });
        if !explained {
            let writes: Vec<String> = last
                .iter()
                .map(|w| format!("op {} {:?} -> {:?}", w.id, w.call, w.outcome))
                .collect();
            lost.push(format!(
                "key {key}: final state {got:?} is not the effect of any last write {writes:?}"
            ));
        }
    }
    lost
}

fn save_evidence(run: &Run, cfg: &RunConfig, history: &History) -> anyhow::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = artifacts_root().join(format!("{}-seed{}-{stamp}", cfg.name, cfg.seed));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    history.save(&dir.join("history.json"))?;
    let result = serde_json::to_string_pretty(&run.result).context("encoding the result")?;
    std::fs::write(dir.join("result.json"), result).context("writing result.json")?;
    let replay = cfg.replay.clone().unwrap_or_else(|| {
        format!(
            "CHAOS_SEED={seed} CHAOS_FAULTS={faults} CHAOS_TOPOLOGY={topo:?} \
             CHAOS_DURATION_SECS={secs} cargo test -p chaos-tests --test t89_chaos_long -- \
             --ignored --nocapture replay",
            seed = cfg.seed,
            faults = cfg
                .faults
                .iter()
                .map(Fault::name)
                .collect::<Vec<_>>()
                .join(","),
            topo = cfg.topology,
            secs = cfg.duration.as_secs(),
        )
    });
    std::fs::write(
        dir.join("seed.txt"),
        format!("{}\nreplay: {replay}\n", cfg.seed),
    )
    .context("writing seed.txt")?;
    std::fs::write(dir.join("nemesis.log"), run.result.log.join("\n")).context("nemesis.log")?;
    for (id, node) in &run.c.nodes {
        let _ = std::fs::copy(&node.spec.log, dir.join(format!("node-{id}.log")));
    }
    for (host, agent) in &run.c.agents {
        let _ = std::fs::copy(&agent.spec.log, dir.join(format!("agent-{host}.log")));
    }
    Ok(dir)
}

/// Totals over many runs, printed as the long profile's table.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub runs: u64,
    pub failed_runs: u64,
    pub faults: BTreeMap<String, u64>,
    pub ops: Counts,
    pub violations: u64,
    pub inconclusive: u64,
    pub jobs: u64,
    pub jobs_succeeded: u64,
    pub elapsed: Duration,
    pub evidence: Vec<PathBuf>,
}

impl Summary {
    pub fn add(&mut self, r: &RunResult) {
        self.runs += 1;
        for (k, v) in &r.faults {
            *self.faults.entry(k.clone()).or_default() += v;
        }
        self.ops.add(&r.ops);
        self.violations += r.violations() as u64;
        self.inconclusive += r.inconclusive.len() as u64;
        self.jobs += r.jobs;
        self.jobs_succeeded += r.jobs_succeeded;
        if let Some(a) = &r.artifacts {
            self.evidence.push(a.clone());
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| measure | value |")?;
        writeln!(f, "|---|---:|")?;
        writeln!(f, "| wall time | {:.0} s |", self.elapsed.as_secs_f64())?;
        writeln!(f, "| runs | {} |", self.runs)?;
        writeln!(f, "| runs that failed to complete | {} |", self.failed_runs)?;
        for (k, v) in &self.faults {
            writeln!(f, "| faults: {k} | {v} |")?;
        }
        let total: u64 = self.faults.values().sum();
        writeln!(f, "| faults: total | {total} |")?;
        writeln!(f, "| operations | {} |", self.ops.total())?;
        writeln!(f, "| operations ok | {} |", self.ops.ok)?;
        writeln!(f, "| operations failed (definite) | {} |", self.ops.failed)?;
        writeln!(f, "| operations unknown | {} |", self.ops.unknown)?;
        writeln!(f, "| jobs acknowledged | {} |", self.jobs)?;
        writeln!(f, "| jobs ended SUCCESS | {} |", self.jobs_succeeded)?;
        writeln!(f, "| violations | {} |", self.violations)?;
        writeln!(
            f,
            "| keys the checker could not decide | {} |",
            self.inconclusive
        )?;
        for e in &self.evidence {
            writeln!(f, "evidence: {}", e.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: usize, call: Call, t: (u64, u64), outcome: Outcome) -> Op {
        Op {
            id,
            client: id,
            key: "k".into(),
            call,
            invoke_us: t.0,
            complete_us: t.1,
            outcome,
            nodes: vec![1],
        }
    }

    fn create(d: &str) -> Call {
        Call::Create {
            description: d.into(),
        }
    }

    fn state(d: Option<&str>) -> BTreeMap<String, String> {
        d.map(|d| ("k".to_string(), d.to_string()))
            .into_iter()
            .collect()
    }

    #[test]
    fn an_acknowledged_create_missing_at_the_end_is_lost() {
        let h = History::from_ops(vec![op(0, create("a"), (0, 10), Outcome::Ok(Ret::Created))]);
        assert_eq!(lost_writes(&h, &state(None)).len(), 1);
        assert!(lost_writes(&h, &state(Some("a"))).is_empty());
        // Another description than the last acknowledged create's is lost too.
        assert_eq!(lost_writes(&h, &state(Some("b"))).len(), 1);
    }

    #[test]
    fn only_writes_no_acknowledged_write_followed_explain_the_end() {
        let h = History::from_ops(vec![
            op(0, create("a"), (0, 10), Outcome::Ok(Ret::Created)),
            op(1, Call::Delete, (20, 30), Outcome::Ok(Ret::Deleted)),
        ]);
        assert!(lost_writes(&h, &state(None)).is_empty());
        assert_eq!(
            lost_writes(&h, &state(Some("a"))).len(),
            1,
            "the delete was lost"
        );
        // An unknown create after the delete may or may not have happened.
        let h = History::from_ops(vec![
            op(0, create("a"), (0, 10), Outcome::Ok(Ret::Created)),
            op(1, Call::Delete, (20, 30), Outcome::Ok(Ret::Deleted)),
            op(
                2,
                create("b"),
                (40, 50),
                Outcome::Unknown {
                    why: "timeout".into(),
                },
            ),
        ]);
        assert!(lost_writes(&h, &state(None)).is_empty());
        assert!(lost_writes(&h, &state(Some("b"))).is_empty());
        assert_eq!(lost_writes(&h, &state(Some("a"))).len(), 1);
        // Concurrent acknowledged writes: either may be last.
        let h = History::from_ops(vec![
            op(0, create("a"), (0, 100), Outcome::Ok(Ret::Created)),
            op(1, Call::Delete, (10, 90), Outcome::Ok(Ret::Deleted)),
        ]);
        assert!(lost_writes(&h, &state(None)).is_empty());
        assert!(lost_writes(&h, &state(Some("a"))).is_empty());
        // Only an unknown create: it may have happened or not.
        let h = History::from_ops(vec![op(
            0,
            create("a"),
            (0, 10),
            Outcome::Unknown {
                why: "503 DRP-4001".into(),
            },
        )]);
        assert!(lost_writes(&h, &state(None)).is_empty());
        assert!(lost_writes(&h, &state(Some("a"))).is_empty());
        assert_eq!(lost_writes(&h, &state(Some("b"))).len(), 1);
    }

    #[test]
    fn fault_names_parse_back() {
        for f in Fault::ALL {
            assert_eq!(Fault::parse(f.name()), Some(*f));
        }
        assert_eq!(
            Fault::parse_list("site-loss, bridge").expect("valid list"),
            vec![Fault::SiteLoss, Fault::Bridge]
        );
        assert!(Fault::parse_list("site-loss,nope").is_err());
        assert_eq!(Topology::parse("5"), Some(Topology::FiveNodes221));
    }
}
