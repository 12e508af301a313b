//! Replication under faults (issue #8): `fs` agents killed during syncs and failovers, the
//! leader killed mid-operation, an unplanned failover while the source's agent is down,
//! reinits afterwards. Checkers:
//! - *never two writable primaries*: a sampler reads every pair's two copies on disk
//!   (a copy is writable while its volume has no `FENCED` marker) every ~50 ms; a sample
//!   with both copies writable is a violation. The one documented exception is an
//!   unplanned failover: the old source's host is down, so its copy (unreachable) cannot
//!   be fenced first; a `fenceOldPrimary` job (or the reinit that brings it back) fences
//!   it as soon as its agent returns. From the unplanned failover until that reinit ends
//!   such samples are counted apart (and printed, with how many came after the agent's
//!   return), not as violations.
//! - *every job ends* SUCCESS or FAIL (with a reason), and none is left running;
//! - *replicas converge after healing*: after a final sync, each pair's two images are
//!   byte-identical, hold the last data written to the primary, and exactly one copy (the
//!   API's source) is writable.

#![allow(clippy::needless_range_loop)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chaos_tests::Cluster;
use serde_json::{json, Value};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const FAST: &[&str] = &["--task-lease-ms", "3000", "--host-offline-after-ms", "3000"];
const MIB: usize = 1 << 20;
const PAIRS: usize = 4;
const HOSTS: [&str; 2] = ["h1", "h2"];

/// Seeded xorshift: every choice of the scenario comes from it.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..len).map(|_| (r.next() >> 24) as u8).collect()
}

fn vol_dir(root: &std::path::Path, host: &str, volume: &str) -> PathBuf {
    root.join(format!("agent-{host}"))
        .join("volumes/pools/default")
        .join(volume)
}

/// A copy is writable when its image exists and it carries no fence marker.
fn writable(root: &std::path::Path, host: &str, volume: &str) -> bool {
    let d = vol_dir(root, host, volume);
    d.join("data").exists() && !d.join("FENCED").exists()
}

#[derive(Default, Debug)]
struct Samples {
    rounds: u64,
    /// (ms since start, pair): both copies writable, outside any documented window.
    violations: Vec<(u128, String)>,
    /// Both writable inside an unplanned failover's window (old source not yet fenced).
    in_window: BTreeMap<String, Vec<u128>>,
    /// Samples with no writable copy (between fence and promote, or after a failed op).
    none_writable: BTreeMap<String, u64>,
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// GET through the current leader, retrying while nodes come and go.
async fn api_get(c: &mut Cluster, path: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(leader) = c.wait_leader(Duration::from_secs(20)).await {
            match c.get(leader, path).await {
                Ok(r) if r.status == 200 => return Ok(r.body),
                Ok(r) => last = format!("{} {}", r.status, r.text),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("GET {path}: {last}")
}

async fn pair(c: &mut Cluster, id: &str) -> anyhow::Result<Value> {
    Ok(api_get(c, &format!("/drplane/v1/pairs/{id}")).await?["pair"].clone())
}

async fn patch_pair(c: &mut Cluster, id: &str, body: Value) -> anyhow::Result<()> {
    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    let r = c
        .request(
            leader,
            reqwest::Method::PATCH,
            &format!("/drplane/v1/pairs/{id}"),
            Some(&body),
            &[],
        )
        .await?;
    if r.status != 200 {
        bail!("PATCH {id} {body}: {} {}", r.status, r.text);
    }
    Ok(())
}

/// Posts a pair action; returns its job id.
async fn action(c: &mut Cluster, id: &str, body: Value) -> anyhow::Result<String> {
    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    let r = c
        .post(leader, &format!("/drplane/v1/pairs/{id}/actions"), &body)
        .await?;
    if r.status != 202 {
        bail!("{id} {body}: {} {}", r.status, r.text);
    }
    Ok(r.body["job"]["job_id"]
        .as_str()
        .context("job id")?
        .to_string())
}

/// Waits for a job to end; a job that does not end in time is a failure (with evidence).
async fn wait_job(c: &mut Cluster, id: &str, timeout: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let j = api_get(c, &format!("/drplane/v1/jobs/{id}")).await?;
        if matches!(j["status"].as_str(), Some("SUCCESS" | "FAIL")) {
            return Ok(j);
        }
        if Instant::now() > deadline {
            bail!(
                "job {id} did not end within {timeout:?}: {j:#}\n--- h1:\n{}\n--- h2:\n{}",
                tail(&c.agent_log("h1"), 20),
                tail(&c.agent_log("h2"), 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Records a job's outcome: SUCCESS, or FAIL with a non-empty reason.
fn record(outcomes: &mut Vec<String>, what: &str, j: &Value) -> anyhow::Result<bool> {
    let status = j["status"].as_str().unwrap_or("?");
    let reason = j["fail_reason"].as_str().unwrap_or("");
    if status == "FAIL" && reason.is_empty() {
        bail!("{what}: job FAIL without a reason: {j}");
    }
    let line = if status == "SUCCESS" {
        format!("{what}: SUCCESS")
    } else {
        format!("{what}: FAIL ({reason})")
    };
    eprintln!("t85: {line}");
    outcomes.push(line);
    Ok(status == "SUCCESS")
}

/// Writes `len` bytes at `off` into the pair's writable copy (refusing a fenced one).
fn write_primary(
    root: &std::path::Path,
    host: &str,
    volume: &str,
    expected: &mut [u8],
    off: usize,
    len: usize,
    seed: u64,
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    if !writable(root, host, volume) {
        bail!("{volume}@{host} is fenced; not writing to it");
    }
    let patch = pattern(len, seed);
    expected[off..off + len].copy_from_slice(&patch);
    let path = vol_dir(root, host, volume).join("data");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    f.write_all_at(&patch, off as u64)?;
    f.sync_data()?;
    Ok(())
}

/// Polls a job (every 20 ms, up to 30 s) until `check` holds for its tasks (in plan
/// order); returns a short `kind=status` listing of them.
async fn wait_tasks(
    c: &mut Cluster,
    job: &str,
    check: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = api_get(c, &format!("/drplane/v1/jobs/{job}")).await?;
        let tasks = j["tasks"].as_array().cloned().unwrap_or_default();
        let ended = matches!(j["status"].as_str(), Some("SUCCESS" | "FAIL"));
        if (!tasks.is_empty() && check(&tasks)) || ended || Instant::now() > deadline {
            return Ok(tasks
                .iter()
                .map(|t| {
                    format!(
                        "{}={}",
                        t["kind"]["type"].as_str().unwrap_or("?"),
                        t["status"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(","));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_running_sync(c: &mut Cluster, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let j = api_get(c, "/drplane/v1/jobs?status=RUNNING&type=replicationSync").await?;
        let n = j["jobs"].as_array().map_or(0, |a| a.len());
        if n > 0 || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_during_syncs_and_failovers_never_two_writable_and_replicas_converge(
) -> anyhow::Result<()> {
    let seed: u64 = std::env::var("T85_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(85);
    eprintln!("t85: seed {seed} (T85_SEED replays)");
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let t0 = Instant::now();

    let mut c = Cluster::start(&SITES, FAST).await?;
    let root = c.dir.path().to_path_buf();

    // h1 runs four small servers; h2 receives their replicas.
    let sizes: Vec<usize> = (0..PAIRS).map(|_| rng.range(2, 4) as usize * MIB).collect();
    let vols: Vec<String> = (1..=PAIRS).map(|i| format!("vm-{i}-root")).collect();
    let pids: Vec<String> = (1..=PAIRS).map(|i| format!("p{i}")).collect();
    let mut toml = String::new();
    for i in 0..PAIRS {
        toml.push_str(&format!(
            "[[servers]]\nid = \"vm-{n}\"\nproject = \"demo\"\nname = \"vm-{n}\"\nvcpus = 1\n\
             ram_mb = 512\ndisks = [{{ id = \"{v}\", size_bytes = {s} }}]\n\n",
            n = i + 1,
            v = vols[i],
            s = sizes[i]
        ));
    }
    let config = root.join("h1.toml");
    std::fs::write(&config, toml)?;
    let config = config.to_string_lossy().into_owned();
    c.spawn_agent_with("h1", "site-a", "fs", &["--config", &config])?;
    c.spawn_agent("h2", "site-b", "fs")?;
    c.wait_hosts_state(&HOSTS, "online", Duration::from_secs(30))
        .await?;

    // Known data, then the pairs (sleep_time 1).
    let mut expected: Vec<Vec<u8>> = Vec::new();
    for i in 0..PAIRS {
        let data = pattern(sizes[i], seed * 100 + i as u64);
        std::fs::write(vol_dir(&root, "h1", &vols[i]).join("data"), &data)?;
        expected.push(data);
    }
    let mut create_jobs = Vec::new();
    for i in 0..PAIRS {
        let leader = c.wait_leader(Duration::from_secs(20)).await?;
        let r = c
            .post(
                leader,
                "/drplane/v1/pairs",
                &json!({
                    "id": pids[i],
                    "project": "demo",
                    "source": {"host": "h1", "pool": "default", "volume_id": vols[i],
                               "size_bytes": sizes[i], "layout": "block"},
                    "target": {"host": "h2", "pool": "default"},
                    "sleep_time": 1,
                }),
            )
            .await?;
        assert_eq!(r.status, 202, "create {}: {}", pids[i], r.text);
        create_jobs.push(r.body["job_id"].as_str().context("job id")?.to_string());
    }
    let mut outcomes = Vec::new();
    for (i, j) in create_jobs.iter().enumerate() {
        let job = wait_job(&mut c, j, Duration::from_secs(60)).await?;
        assert!(
            record(&mut outcomes, &format!("create {}", pids[i]), &job)?,
            "{job}"
        );
    }

    // The sampler: every ~50 ms, both copies of every pair, from the files on disk.
    let stop = Arc::new(AtomicBool::new(false));
    let window: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let sampler = {
        let (stop, window, root) = (stop.clone(), window.clone(), root.clone());
        let pairs: Vec<(String, String)> = pids.iter().cloned().zip(vols.clone()).collect();
        std::thread::spawn(move || {
            let mut s = Samples::default();
            while !stop.load(Ordering::SeqCst) {
                s.rounds += 1;
                for (p, v) in &pairs {
                    // Read a, b, a, b: both writable at all four reads means both were
                    // writable at one instant (a fence and a promote cannot both happen
                    // between two reads microseconds apart).
                    let a1 = writable(&root, "h1", v);
                    let b1 = writable(&root, "h2", v);
                    let a2 = writable(&root, "h1", v);
                    let b2 = writable(&root, "h2", v);
                    let at = t0.elapsed().as_millis();
                    if a1 && b1 && a2 && b2 {
                        if window.lock().unwrap().contains(p) {
                            s.in_window.entry(p.clone()).or_default().push(at);
                        } else {
                            s.violations.push((at, p.clone()));
                        }
                    } else if !a1 && !b1 && !a2 && !b2 {
                        *s.none_writable.entry(p.clone()).or_default() += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            s
        })
    };

    // Choices: two pairs fail over planned, one unplanned, one only syncs.
    let mut order: Vec<usize> = (0..PAIRS).collect();
    for i in (1..PAIRS).rev() {
        order.swap(i, rng.range(0, i as u64) as usize);
    }
    let (planned, unplanned, quiet) = ([order[0], order[1]], order[2], order[3]);
    eprintln!(
        "t85: planned {} {}, unplanned {}, syncs only {}",
        pids[planned[0]], pids[planned[1]], pids[unplanned], pids[quiet]
    );
    let mut faults: Vec<String> = Vec::new();

    // 1. New data on every source, then kill h2 (the syncs' target host) mid-sync.
    for i in 0..PAIRS {
        let off = rng.range(0, (sizes[i] - 256 * 1024) as u64) as usize;
        write_primary(
            &root,
            "h1",
            &vols[i],
            &mut expected[i],
            off,
            256 * 1024,
            seed + 10 + i as u64,
        )?;
    }
    let running = wait_running_sync(&mut c, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(rng.range(0, 200))).await;
    c.kill_agent("h2")?;
    faults.push(format!("kill agent h2 with {running} sync job(s) running"));
    c.wait_hosts_state(&["h2"], "offline", Duration::from_secs(20))
        .await?;
    c.restart_agent("h2")?;
    c.wait_hosts_state(&["h2"], "online", Duration::from_secs(30))
        .await?;

    // 2. Planned failovers (Sync@h2 pulling from h1 -> Fence@h1 -> Promote@h2), one at a
    //    time: the first with h1 (the source's host) killed while its final sync runs, the
    //    second with the agent of its next step killed once the sync is done (h1 before
    //    the fence, or h2 before the promote: fenced, not yet promoted).
    // Slow the planned pairs' syncs (1 MiB/s) so that the final sync is still running
    // when the agent is killed; a 1 MiB change spans two 1 MiB blocks: about 2 s.
    for &i in &planned {
        patch_pair(&mut c, &pids[i], json!({"bwlimit": MIB})).await?;
    }
    for &i in &planned {
        let off = rng.range(0, (sizes[i] - MIB) as u64) as usize;
        write_primary(
            &root,
            "h1",
            &vols[i],
            &mut expected[i],
            off,
            MIB,
            seed + 20 + i as u64,
        )?;
    }
    let mut jobs = Vec::new();
    for (k, &i) in planned.iter().enumerate() {
        let j = action(&mut c, &pids[i], json!({"failover": {"planned": true}})).await?;
        let (victim, tasks) = if k == 0 {
            let t = wait_tasks(&mut c, &j, |t| {
                matches!(t[0]["status"].as_str(), Some("assigned" | "running"))
            })
            .await?;
            ("h1", t)
        } else {
            let t = wait_tasks(&mut c, &j, |t| t[0]["status"] == "succeeded").await?;
            let fenced = t.contains("fence=succeeded");
            (if fenced { "h2" } else { "h1" }, t)
        };
        c.kill_agent(victim)?;
        faults.push(format!(
            "kill agent {victim} during planned failover {} (tasks: {tasks})",
            pids[i]
        ));
        tokio::time::sleep(Duration::from_millis(rng.range(1000, 4000))).await;
        c.restart_agent(victim)?;
        jobs.push((i, j));
    }
    for (i, j) in jobs {
        let job = wait_job(&mut c, &j, Duration::from_secs(90)).await?;
        if record(
            &mut outcomes,
            &format!("planned failover {}", pids[i]),
            &job,
        )? {
            let p = pair(&mut c, &pids[i]).await?;
            assert_eq!(p["state"], "failed_over", "{p}");
            assert_eq!(p["source"]["host"], "h2", "{p}");
            // No data loss: the promoted copy holds everything written before.
            let got = std::fs::read(vol_dir(&root, "h2", &vols[i]).join("data"))?;
            assert!(
                got == expected[i],
                "{}: planned failover lost data",
                pids[i]
            );
        }
    }
    for &i in &planned {
        patch_pair(&mut c, &pids[i], json!({"bwlimit": null})).await?;
    }
    c.wait_hosts_state(&HOSTS, "online", Duration::from_secs(30))
        .await?;

    // 3. Unplanned failover of another pair while h1 (its source's host) is down; reinits
    //    submitted while h1 is still down, the leader killed once after that.
    c.kill_agent("h1")?;
    faults.push("kill agent h1, then unplanned failover".into());
    window.lock().unwrap().insert(pids[unplanned].clone());
    let j = action(
        &mut c,
        &pids[unplanned],
        json!({"failover": {"planned": false}}),
    )
    .await?;
    let job = wait_job(&mut c, &j, Duration::from_secs(60)).await?;
    let unplanned_ok = record(
        &mut outcomes,
        &format!("unplanned failover {}", pids[unplanned]),
        &job,
    )?;
    assert!(
        unplanned_ok,
        "the unplanned failover runs on h2 only: {job}"
    );
    // Work on the promoted copy: the whole image rewritten.
    let i = unplanned;
    let len = sizes[i];
    write_primary(&root, "h2", &vols[i], &mut expected[i], 0, len, seed + 30)?;
    let mut reinits = Vec::new();
    for i in 0..PAIRS {
        let p = pair(&mut c, &pids[i]).await?;
        if p["state"] == "failed_over" {
            let host = p["source"]["host"].as_str().unwrap_or("?").to_string();
            if i != unplanned {
                let off = rng.range(0, (sizes[i] - 64 * 1024) as u64) as usize;
                write_primary(
                    &root,
                    &host,
                    &vols[i],
                    &mut expected[i],
                    off,
                    64 * 1024,
                    seed + 40 + i as u64,
                )?;
            }
            reinits.push((i, action(&mut c, &pids[i], json!({"reinit": {}})).await?));
        }
    }
    tokio::time::sleep(Duration::from_millis(rng.range(100, 500))).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    c.kill(leader)?;
    faults.push(format!("kill leader node {leader} with reinits pending"));
    tokio::time::sleep(Duration::from_millis(rng.range(1000, 2500))).await;
    c.restart(leader)?;
    tokio::time::sleep(Duration::from_millis(rng.range(500, 1500))).await;
    c.restart_agent("h1")?;
    let h1_back = t0.elapsed().as_millis();
    for (i, j) in reinits {
        let job = wait_job(&mut c, &j, Duration::from_secs(90)).await?;
        record(&mut outcomes, &format!("reinit {}", pids[i]), &job)?;
    }
    window.lock().unwrap().remove(&pids[unplanned]);

    // 4. Heal: everything up, periodic syncs off, every pair active, a final sync.
    for id in c.ids() {
        if !c.is_running(id) {
            c.restart(id)?;
        }
    }
    for h in HOSTS {
        if !c.is_agent_running(h) {
            c.restart_agent(h)?;
        }
    }
    c.wait_leader(Duration::from_secs(30)).await?;
    c.wait_hosts_state(&HOSTS, "online", Duration::from_secs(30))
        .await?;
    for i in 0..PAIRS {
        patch_pair(&mut c, &pids[i], json!({"enabled": false})).await?;
    }
    for i in 0..PAIRS {
        for _ in 0..3 {
            let p = pair(&mut c, &pids[i]).await?;
            if let Some(j) = p["busy_job"].as_str() {
                let job = wait_job(&mut c, j, Duration::from_secs(90)).await?;
                record(&mut outcomes, &format!("pending job of {}", pids[i]), &job)?;
                continue;
            }
            let body = match p["state"].as_str() {
                Some("active") => break,
                Some("failed_over") => json!({"reinit": {}}),
                Some("error") => {
                    let (s, t) = (
                        p["source"]["host"].as_str().unwrap_or("?"),
                        p["target"]["host"].as_str().unwrap_or("?"),
                    );
                    if !writable(&root, s, &vols[i]) && !writable(&root, t, &vols[i]) {
                        // A planned failover failed after fencing the source: the
                        // documented way on is an unplanned failover, then a reinit.
                        json!({"failover": {"planned": false}})
                    } else {
                        json!({"reinit": {}})
                    }
                }
                other => bail!("{}: unexpected state {other:?}: {p}", pids[i]),
            };
            let j = action(&mut c, &pids[i], body.clone()).await?;
            let job = wait_job(&mut c, &j, Duration::from_secs(90)).await?;
            record(&mut outcomes, &format!("heal {} {body}", pids[i]), &job)?;
        }
        let j = action(&mut c, &pids[i], json!({"sync": {}})).await?;
        let job = wait_job(&mut c, &j, Duration::from_secs(90)).await?;
        assert!(
            record(&mut outcomes, &format!("final sync {}", pids[i]), &job)?,
            "{job}"
        );
    }

    // Every job ended: none left INIT or RUNNING.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        for s in ["INIT", "RUNNING"] {
            let j = api_get(&mut c, &format!("/drplane/v1/jobs?status={s}")).await?;
            left.extend(j["jobs"].as_array().cloned().unwrap_or_default());
        }
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("jobs still not ended 60 s after healing: {left:#?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in ["SUCCESS", "FAIL"] {
        let j = api_get(&mut c, &format!("/drplane/v1/jobs?status={s}&limit=1000")).await?;
        let jobs = j["jobs"].as_array().cloned().unwrap_or_default();
        for j in jobs {
            if s == "FAIL" && j["fail_reason"].as_str().unwrap_or("").is_empty() {
                bail!("a job FAILed without a reason: {j}");
            }
            *counts
                .entry(format!("{} {s}", j["type"].as_str().unwrap_or("?")))
                .or_default() += 1;
        }
    }

    // Replicas converge; exactly one writable copy, the API's source.
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().expect("sampler");
    let mut problems = Vec::new();
    for i in 0..PAIRS {
        let p = pair(&mut c, &pids[i]).await?;
        let s = p["source"]["host"].as_str().unwrap_or("?").to_string();
        let t = p["target"]["host"].as_str().unwrap_or("?").to_string();
        let a = std::fs::read(vol_dir(&root, &s, &vols[i]).join("data"))?;
        let b = std::fs::read(vol_dir(&root, &t, &vols[i]).join("data"))?;
        if a != b {
            problems.push(format!(
                "{}: the copies differ after the final sync",
                pids[i]
            ));
        }
        if a != expected[i] {
            problems.push(format!(
                "{}: the primary ({s}) does not hold the last data written",
                pids[i]
            ));
        }
        let (ws, wt) = (writable(&root, &s, &vols[i]), writable(&root, &t, &vols[i]));
        if !ws || wt {
            problems.push(format!(
                "{}: writable source {s}={ws}, target {t}={wt} (want exactly the source): {p}",
                pids[i]
            ));
        }
    }

    eprintln!(
        "t85: ---- summary (seed {seed}, {:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    for f in &faults {
        eprintln!("t85: fault: {f}");
    }
    for o in &outcomes {
        eprintln!("t85: job: {o}");
    }
    eprintln!("t85: all jobs by type and status: {counts:?}");
    eprintln!(
        "t85: sampler: {} rounds, {} two-writable violations, no-writable samples: {:?}",
        samples.rounds,
        samples.violations.len(),
        samples.none_writable
    );
    for (p, at) in &samples.in_window {
        let after = at.iter().filter(|&&t| t >= h1_back).count();
        eprintln!(
            "t85: documented unplanned-failover window of {p}: {} two-writable samples from \
             {} ms to {} ms; {after} of them after h1's agent restarted at {h1_back} ms \
             (old source writable and served until the reinit's fence)",
            at.len(),
            at[0],
            at[at.len() - 1]
        );
    }
    assert!(
        samples.violations.is_empty(),
        "two writable copies of one pair: {:?}",
        samples.violations
    );
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}
