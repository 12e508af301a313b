//! The leader's scheduler and real agents (`drplane agent --driver sim`), through the
//! public API only: jobs of `sleep` tasks (POST /drplane/v1/jobs) run on agents, survive a
//! leader kill and an agent kill, and a late report with a stale fencing token changes
//! nothing.
//!
//! "Completed exactly once" is checked on both sides: the job's tasks (status, attempt,
//! fencing token) from GET /drplane/v1/jobs/{id}, and every agent's record of the attempts
//! it ran to their end (`<data>/agent/completions.jsonl`, written before the result is
//! sent).
//!
//! The tests share two cores with three nodes and up to three agents each, so they run one
//! at a time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chaos_tests::Cluster;
use serde_json::{json, Value};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
/// A short lease and offline delay so that losses are noticed within seconds.
const FAST: &[&str] = &["--task-lease-ms", "3000", "--host-offline-after-ms", "3000"];

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn create_job(c: &mut Cluster, body: &Value) -> anyhow::Result<String> {
    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    let r = c.post(leader, "/drplane/v1/jobs", body).await?;
    if r.status != 201 {
        bail!("create job: {} {}", r.status, r.text);
    }
    r.body["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no job id in {}", r.text))
}

/// The job with its tasks, through any running node.
async fn job(c: &mut Cluster, id: &str) -> anyhow::Result<Value> {
    let mut last = String::new();
    for n in c.ids() {
        if !c.is_running(n) {
            continue;
        }
        match c.get(n, &format!("/drplane/v1/jobs/{id}")).await {
            Ok(r) if r.status == 200 => return Ok(r.body),
            Ok(r) => last = format!("{} {}", r.status, r.text),
            Err(e) => last = e.to_string(),
        }
    }
    bail!("cannot read job {id}: {last}")
}

fn task<'a>(job: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    let suffix = format!(".{name}");
    job["tasks"]
        .as_array()
        .and_then(|ts| {
            ts.iter()
                .find(|t| t["id"].as_str().is_some_and(|id| id.ends_with(&suffix)))
        })
        .ok_or_else(|| anyhow!("no task {name} in {job}"))
}

fn agent_logs(c: &Cluster) -> String {
    c.agents
        .keys()
        .map(|h| {
            let text = c.agent_log(h);
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- agent {h}:\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until every job ended; returns them.
async fn wait_ended(
    c: &mut Cluster,
    ids: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut jobs = Vec::new();
        for id in ids {
            if let Ok(j) = job(c, id).await {
                jobs.push(j);
            }
        }
        if jobs.len() == ids.len()
            && jobs
                .iter()
                .all(|j| j["status"] == "SUCCESS" || j["status"] == "FAIL")
        {
            return Ok(jobs);
        }
        if Instant::now() > deadline {
            let states: Vec<String> = jobs
                .iter()
                .map(|j| {
                    let tasks: Vec<String> = j["tasks"]
                        .as_array()
                        .map(|ts| {
                            ts.iter()
                                .map(|t| {
                                    format!(
                                        "{}:{}@{}#{}",
                                        t["id"]
                                            .as_str()
                                            .unwrap_or("?")
                                            .rsplit('.')
                                            .next()
                                            .unwrap_or("?"),
                                        t["status"],
                                        t["assigned_agent"],
                                        t["attempt"]
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    format!("{} {} {tasks:?}", j["id"], j["status"])
                })
                .collect();
            bail!(
                "jobs not ended within {timeout:?}: {states:#?}\n{}",
                agent_logs(c)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `pred` holds for the job.
async fn wait_job(
    c: &mut Cluster,
    id: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let j = job(c, id).await;
        if let Ok(j) = &j {
            if pred(j) {
                return Ok(j.clone());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "job {id}: {what} not seen within {timeout:?}; last {j:?}\n{}",
                agent_logs(c)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every agent's completion records, by task id.
fn records(c: &Cluster) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for h in c.agents.keys() {
        for r in c.agent_completions(h) {
            if let Some(id) = r["task_id"].as_str() {
                out.entry(id.to_string()).or_default().push(r.clone());
            }
        }
    }
    out
}

fn successes(recs: &BTreeMap<String, Vec<Value>>, task_id: &str) -> Vec<Value> {
    recs.get(task_id)
        .map(|v| {
            v.iter()
                .filter(|r| r["outcome"] == "succeeded")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Every task of every job succeeded and was run to success by exactly one agent, under
/// the token the task shows.
fn check_exactly_once(c: &Cluster, jobs: &[Value]) -> anyhow::Result<()> {
    let recs = records(c);
    for j in jobs {
        if j["status"] != "SUCCESS" {
            bail!(
                "job {} ended {}: {}",
                j["id"],
                j["status"],
                j["fail_reason"]
            );
        }
        for t in j["tasks"].as_array().context("tasks")? {
            let id = t["id"].as_str().context("task id")?;
            if t["status"] != "succeeded" {
                bail!("task {id} is {}", t["status"]);
            }
            let ok = successes(&recs, id);
            if ok.len() != 1 {
                bail!("task {id} completed {} times: {ok:#?}", ok.len());
            }
            let (rec, token) = (&ok[0], &t["fencing_token"]);
            if rec["attempt"] != token["attempt"] || rec["term"] != token["term"] {
                bail!("task {id}: the agent completed {rec} but the task shows token {token}");
            }
            if rec["host"] != t["assigned_agent"] {
                bail!(
                    "task {id}: completed on {} but assigned to {}",
                    rec["host"],
                    t["assigned_agent"]
                );
            }
        }
    }
    Ok(())
}

/// A scheduler metric from the leader's /metrics.
async fn leader_metric(c: &mut Cluster, name: &str) -> anyhow::Result<f64> {
    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    let r = c.get(leader, "/metrics").await?;
    r.text
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .ok_or_else(|| anyhow!("no metric {name} on node {leader}"))
}

fn diamond() -> Value {
    json!({"tasks": [
        {"name": "a", "duration_ms": 300},
        {"name": "b", "duration_ms": 200, "depends_on": ["a"]},
        {"name": "c", "duration_ms": 400, "depends_on": ["a"]},
        {"name": "d", "duration_ms": 100, "depends_on": ["b", "c"]},
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_dependent_tasks_run_each_task_once() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(&SITES, &[]).await?;
    for (h, s) in [("h1", "site-a"), ("h2", "site-b"), ("h3", "site-c")] {
        c.spawn_agent(h, s, "sim")?;
    }
    let hosts = c
        .wait_hosts_state(&["h1", "h2", "h3"], "online", Duration::from_secs(30))
        .await?;
    for (name, h) in &hosts {
        assert_eq!(h["driver"], "sim", "{name}: {h}");
        assert!(h["last_heartbeat"].is_string(), "{name}: {h}");
    }
    assert_eq!(hosts["h2"]["site"], "site-b");

    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(create_job(&mut c, &diamond()).await?);
    }
    let retry = json!({"tasks": [
        {"name": "x", "duration_ms": 100, "fail_attempts": 1, "max_attempts": 3},
        {"name": "y", "duration_ms": 100, "depends_on": ["x"]},
    ]});
    let retry_id = create_job(&mut c, &retry).await?;
    ids.push(retry_id.clone());

    let jobs = wait_ended(&mut c, &ids, Duration::from_secs(60)).await?;
    check_exactly_once(&c, &jobs)?;

    // Dependencies ran in order: a task started after each of its dependencies finished.
    let recs = records(&c);
    for j in &jobs {
        for t in j["tasks"].as_array().context("tasks")? {
            let id = t["id"].as_str().context("id")?;
            let started = successes(&recs, id)[0]["started_at_ms"]
                .as_u64()
                .context("start")?;
            for dep in t["depends_on"].as_array().context("deps")? {
                let dep = dep.as_str().context("dep")?;
                let finished = successes(&recs, dep)[0]["finished_at_ms"]
                    .as_u64()
                    .context("finish")?;
                assert!(
                    started >= finished,
                    "{id} started at {started} before its dependency {dep} finished at {finished}"
                );
            }
        }
    }

    // The retried task: one failed attempt, then success at attempt 2.
    let rj = jobs
        .iter()
        .find(|j| j["id"] == retry_id.as_str())
        .context("retry job")?;
    let x = task(rj, "x")?;
    assert_eq!(x["attempt"], 2, "{x}");
    let x_id = x["id"].as_str().context("x id")?;
    let failed: Vec<&Value> = recs[x_id]
        .iter()
        .filter(|r| r["outcome"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["attempt"], 1);
    for j in &jobs {
        for t in j["tasks"].as_array().context("tasks")? {
            if t["id"] != x_id {
                assert_eq!(t["attempt"], 1, "{t}");
            }
        }
    }

    let dispatched = leader_metric(&mut c, "drplane_scheduler_tasks_dispatched_total").await?;
    assert!(dispatched >= 19.0, "dispatched {dispatched}");
    let agents = leader_metric(&mut c, "drplane_scheduler_connected_agents").await?;
    assert_eq!(agents, 3.0);
    let latency = leader_metric(&mut c, "drplane_scheduler_dispatch_latency_seconds_count").await?;
    assert!(latency >= 19.0, "latency samples {latency}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_with_tasks_in_flight_loses_none_and_runs_none_twice() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(&SITES, &[]).await?;
    for (h, s) in [("h1", "site-a"), ("h2", "site-b"), ("h3", "site-c")] {
        c.spawn_agent(h, s, "sim")?;
    }
    c.wait_hosts_state(&["h1", "h2", "h3"], "online", Duration::from_secs(30))
        .await?;
    let body = json!({"tasks": [
        {"name": "a", "duration_ms": 1500},
        {"name": "b", "duration_ms": 1500, "depends_on": ["a"]},
        {"name": "c", "duration_ms": 1000, "depends_on": ["b"]},
        {"name": "d", "duration_ms": 2500},
    ]});
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(create_job(&mut c, &body).await?);
    }
    // Wait until work is in flight on the agents.
    let first = ids[0].clone();
    wait_job(
        &mut c,
        &first,
        Duration::from_secs(20),
        "task a running",
        |j| task(j, "a").is_ok_and(|t| t["status"] == "running"),
    )
    .await?;
    let old_leader = c.wait_leader(Duration::from_secs(10)).await?;
    let old_term = c.status(old_leader).await?["term"]
        .as_u64()
        .context("term")?;
    c.kill(old_leader)?;
    let new_leader = c.wait_leader(Duration::from_secs(30)).await?;
    assert_ne!(new_leader, old_leader);
    c.restart(old_leader)?;

    let jobs = wait_ended(&mut c, &ids, Duration::from_secs(90)).await?;
    check_exactly_once(&c, &jobs)?;
    let mut new_term_assignments = 0;
    for j in &jobs {
        for t in j["tasks"].as_array().context("tasks")? {
            assert_eq!(
                t["attempt"], 1,
                "a lease expired across the leader change: {t}"
            );
            if t["fencing_token"]["term"].as_u64().context("term")? > old_term {
                new_term_assignments += 1;
            }
        }
    }
    assert!(
        new_term_assignments > 0,
        "the new leader assigned nothing (old term {old_term})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_task_moves_it_or_fails_the_job() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(&SITES, FAST).await?;
    c.spawn_agent("h1", "site-a", "sim")?;
    c.wait_hosts_state(&["h1"], "online", Duration::from_secs(30))
        .await?;
    let free = create_job(
        &mut c,
        &json!({"tasks": [{"name": "work", "duration_ms": 6000, "max_attempts": 3}]}),
    )
    .await?;
    let pinned = create_job(
        &mut c,
        &json!({"tasks": [{"name": "pinned", "duration_ms": 6000, "max_attempts": 1, "host": "h1"}]}),
    )
    .await?;
    for (id, name) in [(&free, "work"), (&pinned, "pinned")] {
        wait_job(&mut c, id, Duration::from_secs(20), "running on h1", |j| {
            task(j, name).is_ok_and(|t| t["status"] == "running" && t["assigned_agent"] == "h1")
        })
        .await?;
    }
    c.spawn_agent("h2", "site-b", "sim")?;
    let hosts = c
        .wait_hosts_state(&["h1", "h2"], "online", Duration::from_secs(30))
        .await?;
    assert_eq!(hosts["h1"]["state"], "online");

    c.kill_agent("h1")?;
    let hosts = c
        .wait_hosts_state(&["h1"], "offline", Duration::from_secs(20))
        .await?;
    assert_eq!(hosts["h2"]["state"], "online");

    let jobs = wait_ended(
        &mut c,
        &[free.clone(), pinned.clone()],
        Duration::from_secs(60),
    )
    .await?;
    // The unpinned task moved to h2 and succeeded there at its second attempt.
    let fj = &jobs[0];
    assert_eq!(fj["status"], "SUCCESS", "{fj}");
    let work = task(fj, "work")?;
    assert_eq!(work["assigned_agent"], "h2", "{work}");
    assert_eq!(work["attempt"], 2, "{work}");
    assert!(
        work["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("lost its lease") && e.contains("h1")),
        "{work}"
    );
    let recs = records(&c);
    let ok = successes(&recs, work["id"].as_str().context("id")?);
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(ok[0]["host"], "h2");
    // The pinned task could not move: its only attempt lost its lease, the job failed.
    let pj = &jobs[1];
    assert_eq!(pj["status"], "FAIL", "{pj}");
    assert_eq!(pj["error_code"], "TASK_LEASE_EXPIRED", "{pj}");
    let reason = pj["fail_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("h1") && reason.contains("lost its lease"),
        "{reason}"
    );
    assert_eq!(task(pj, "pinned")?["status"], "failed");

    // The agent comes back: its host is online again.
    c.restart_agent("h1")?;
    c.wait_hosts_state(&["h1", "h2"], "online", Duration::from_secs(30))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_report_with_a_stale_token_is_refused() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(&SITES, FAST).await?;
    c.spawn_agent("h1", "site-a", "sim")?;
    c.wait_hosts_state(&["h1"], "online", Duration::from_secs(30))
        .await?;
    let id = create_job(
        &mut c,
        &json!({"tasks": [{"name": "slow", "duration_ms": 4000, "max_attempts": 3}]}),
    )
    .await?;
    wait_job(&mut c, &id, Duration::from_secs(20), "running on h1", |j| {
        task(j, "slow").is_ok_and(|t| t["status"] == "running" && t["assigned_agent"] == "h1")
    })
    .await?;

    // h1 freezes mid-task: its lease runs out and the task goes to h2 (attempt 2).
    c.pause_agent("h1")?;
    c.spawn_agent("h2", "site-b", "sim")?;
    let done = wait_job(&mut c, &id, Duration::from_secs(40), "success on h2", |j| {
        j["status"] == "SUCCESS"
    })
    .await?;
    let before = task(&done, "slow")?.clone();
    assert_eq!(before["assigned_agent"], "h2", "{before}");
    assert_eq!(before["attempt"], 2, "{before}");
    assert_eq!(before["fencing_token"]["attempt"], 2, "{before}");
    let refused_before = leader_metric(&mut c, "drplane_scheduler_reports_refused_total").await?;

    // h1 wakes up, finishes its (old) attempt 1 and reports it with its stale token.
    c.resume_agent("h1")?;
    let task_id = before["id"].as_str().context("id")?.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let late = successes(&records(&c), &task_id)
            .into_iter()
            .any(|r| r["host"] == "h1" && r["attempt"] == 1);
        let refused = leader_metric(&mut c, "drplane_scheduler_reports_refused_total").await?;
        if late && refused > refused_before {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "no refused late report (late completion on h1: {late}, refused {refused_before} -> {refused})\n{}",
                agent_logs(&c)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The refused report changed nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_job = job(&mut c, &id).await?;
    assert_eq!(after_job["status"], "SUCCESS");
    let after = task(&after_job, "slow")?;
    assert_eq!(after, &before, "the stale report changed the task");
    Ok(())
}

/// A leader id as seen by the nodes other than `except`, once they agree on one that is
/// not `except`.
async fn wait_other_leader(c: &mut Cluster, except: u64, timeout: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        for id in c.ids() {
            if id == except || !c.is_running(id) {
                continue;
            }
            if let Ok(r) = c.get(id, "/drplane/v1/cluster?consistency=stale").await {
                if let Some(l) = r.body["leader_id"].as_u64() {
                    seen.push(l);
                }
            }
        }
        if let Some(first) = seen.first() {
            if *first != except && seen.iter().all(|l| l == first) {
                return Ok(*first);
            }
        }
        if Instant::now() > deadline {
            bail!("no new leader within {timeout:?} (seen {seen:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_is_replaced_and_comes_back_deposed() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(&SITES, &[]).await?;
    for (h, s) in [("h1", "site-a"), ("h2", "site-b"), ("h3", "site-c")] {
        c.spawn_agent(h, s, "sim")?;
    }
    c.wait_hosts_state(&["h1", "h2", "h3"], "online", Duration::from_secs(30))
        .await?;
    let body = json!({"tasks": [
        {"name": "a", "duration_ms": 1500},
        {"name": "b", "duration_ms": 1500, "depends_on": ["a"]},
        {"name": "c", "duration_ms": 1000, "depends_on": ["b"]},
        {"name": "d", "duration_ms": 2500},
    ]});
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(create_job(&mut c, &body).await?);
    }
    let first = ids[0].clone();
    wait_job(
        &mut c,
        &first,
        Duration::from_secs(20),
        "task a running",
        |j| task(j, "a").is_ok_and(|t| t["status"] == "running"),
    )
    .await?;

    // The leader freezes with its agents' sessions open: they must notice and move on.
    let old = c.wait_leader(Duration::from_secs(10)).await?;
    c.pause(old)?;
    let new = wait_other_leader(&mut c, old, Duration::from_secs(20)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Back, it learns of the new term and stays deposed: it assigns nothing more.
    c.resume(old)?;

    let jobs = wait_ended(&mut c, &ids, Duration::from_secs(90)).await?;
    check_exactly_once(&c, &jobs)?;
    for j in &jobs {
        for t in j["tasks"].as_array().context("tasks")? {
            assert_eq!(
                t["attempt"], 1,
                "a lease expired across the leader change: {t}"
            );
        }
    }
    // (The returning node may disturb an election or two; whoever leads in the end runs
    // the only scheduler, and every agent finds it.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = c.wait_leader(Duration::from_secs(20)).await?;
        let agents = leader_metric(&mut c, "drplane_scheduler_connected_agents").await?;
        let mut others_idle = true;
        for id in c.ids() {
            if id != leader {
                let r = c.get(id, "/metrics").await?;
                others_idle &= r.text.contains("drplane_scheduler_active 0");
            }
        }
        if agents == 3.0 && others_idle {
            break;
        }
        if Instant::now() > deadline {
            bail!("after the leader change (old {old}, new {new}, now {leader}): {agents} agents on the leader, other schedulers idle: {others_idle}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
