//! Continuous replication between real `fs` agents, through the native pairs API
//! (`/drplane/v1/pairs`): the leader syncs an enabled pair every `sleep_time`, the copy
//! holds exactly the source's bytes, a changed block moves only about that block,
//! disabling stops the syncs and enabling resumes them, a planned failover hands the data
//! to the other side, and a reinit sends back only what changed there. The recovery point
//! shows in the API and as `drplane_replication_rpo_seconds`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chaos_tests::Cluster;
use serde_json::{json, Value};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const MIB: usize = 1 << 20;
const DISK: usize = 8 * MIB;

fn image(c: &Cluster, host: &str, volume: &str) -> PathBuf {
    c.dir
        .path()
        .join(format!("agent-{host}"))
        .join("volumes/pools/default")
        .join(volume)
        .join("data")
}

/// Deterministic bytes (xorshift), so a failure is reproducible.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn pair(c: &mut Cluster, id: &str) -> anyhow::Result<Value> {
    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    let r = c.get(leader, &format!("/drplane/v1/pairs/{id}")).await?;
    if r.status != 200 {
        bail!("pair {id}: {} {}", r.status, r.text);
    }
    Ok(r.body["pair"].clone())
}

/// Waits until `check` holds for the pair; returns it.
async fn wait_pair(
    c: &mut Cluster,
    id: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = pair(c, id).await?;
        if check(&p) {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!(
                "pair {id}: not {what} within {timeout:?}: {p}\n--- agent h1:\n{}\n--- agent h2:\n{}",
                tail(&c.agent_log("h1")),
                tail(&c.agent_log("h2"))
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

async fn wait_job(c: &mut Cluster, id: &str, timeout: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let leader = c.wait_leader(Duration::from_secs(20)).await?;
        let r = c.get(leader, &format!("/drplane/v1/jobs/{id}")).await?;
        if r.status == 200 && matches!(r.body["status"].as_str(), Some("SUCCESS" | "FAIL")) {
            return Ok(r.body);
        }
        if Instant::now() > deadline {
            bail!("job {id} did not end within {timeout:?}: {}", r.text);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_replicates_fails_over_and_reinits_moving_only_changes() -> anyhow::Result<()> {
    let mut c = Cluster::start(&SITES, &[]).await?;
    let config = c.dir.path().join("h1.toml");
    std::fs::write(
        &config,
        format!(
            "[[servers]]\nid = \"vm-1\"\nproject = \"demo\"\nname = \"vm-1\"\nvcpus = 1\n\
             ram_mb = 512\ndisks = [{{ id = \"vm-1-root\", size_bytes = {DISK} }}]\n"
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    c.spawn_agent_with("h1", "site-a", "fs", &["--config", &config])?;
    c.spawn_agent("h2", "site-b", "fs")?;
    c.wait_hosts_state(&["h1", "h2"], "online", Duration::from_secs(30))
        .await?;

    // Known data on the production disk.
    let src = image(&c, "h1", "vm-1-root");
    let mut data = pattern(DISK, 7);
    std::fs::write(&src, &data).with_context(|| format!("writing {}", src.display()))?;

    let leader = c.wait_leader(Duration::from_secs(20)).await?;
    let r = c
        .post(
            leader,
            "/drplane/v1/pairs",
            &json!({
                "id": "p1",
                "project": "demo",
                "source": {"host": "h1", "pool": "default", "volume_id": "vm-1-root",
                           "size_bytes": DISK, "layout": "block"},
                "target": {"host": "h2", "pool": "default"},
                "sleep_time": 1,
            }),
        )
        .await?;
    assert_eq!(r.status, 202, "create pair: {}", r.text);
    let create_job = r.body["job_id"].as_str().context("job id")?.to_string();
    let job = wait_job(&mut c, &create_job, Duration::from_secs(60)).await?;
    assert_eq!(job["status"], "SUCCESS", "{job}");

    // The first (full) sync: the copy is byte for byte the source.
    let p = wait_pair(&mut c, "p1", "active", Duration::from_secs(30), |p| {
        p["state"] == "active" && num(p, "syncs_ok") >= 1
    })
    .await?;
    assert!(p["recovery_point"].is_string(), "{p}");
    let dst = image(&c, "h2", "vm-1-root");
    assert!(
        std::fs::read(&dst)? == data,
        "the copy differs after the first sync"
    );

    // Change one 64 KiB range; the next periodic syncs bring it over, sending about one
    // block (1 MiB blocks), not the 8 MiB disk.
    let patch = pattern(64 << 10, 99);
    data[3 * MIB..3 * MIB + patch.len()].copy_from_slice(&patch);
    std::fs::write(&src, &data)?;
    let before = num(&p, "syncs_ok");
    let p = wait_pair(
        &mut c,
        "p1",
        "synced twice more",
        Duration::from_secs(30),
        |p| num(p, "syncs_ok") >= before + 2,
    )
    .await?;
    assert!(std::fs::read(&dst)? == data, "the copy misses the change");
    let total = num(&p, "bytes_sent_total");
    assert!(
        total < (DISK as u64) * 2,
        "sent {total} bytes for one full sync and a small change"
    );
    let rpo = p["rpo_seconds"].as_f64().context("rpo")?;
    assert!(rpo < 10.0, "rpo {rpo} s with syncs every second");
    let metrics = c.get(leader, "/metrics").await?.text;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("drplane_replication_rpo_seconds{pair=\"p1\"")),
        "no RPO metric for p1"
    );

    // Disabled: no more syncs; enabled: they resume.
    let r = c
        .request(
            leader,
            reqwest::Method::PATCH,
            "/drplane/v1/pairs/p1",
            Some(&json!({"enabled": false})),
            &[],
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.text);
    // A sync that had already started may still end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopped = num(&pair(&mut c, "p1").await?, "syncs_ok");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = pair(&mut c, "p1").await?;
    assert_eq!(num(&p, "syncs_ok"), stopped, "synced while disabled: {p}");
    let r = c
        .request(
            leader,
            reqwest::Method::PATCH,
            "/drplane/v1/pairs/p1",
            Some(&json!({"enabled": true})),
            &[],
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.text);
    wait_pair(
        &mut c,
        "p1",
        "syncing again",
        Duration::from_secs(20),
        |p| num(p, "syncs_ok") > stopped,
    )
    .await?;

    // Planned failover: final sync, fence h1, promote h2. The pair stops until a reinit.
    let r = c
        .post(
            leader,
            "/drplane/v1/pairs/p1/actions",
            &json!({"failover": {"planned": true}}),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text);
    let job_id = r.body["job"]["job_id"].as_str().context("job")?.to_string();
    let job = wait_job(&mut c, &job_id, Duration::from_secs(60)).await?;
    assert_eq!(job["status"], "SUCCESS", "{job}");
    let p = pair(&mut c, "p1").await?;
    assert_eq!(p["state"], "failed_over", "{p}");
    assert_eq!(p["source"]["host"], "h2", "{p}");
    assert_eq!(p["reinit_required"], true, "{p}");
    assert!(std::fs::read(&dst)? == data, "the promoted copy lost data");

    // Work on the new primary, then reinit: h1 gets only the changes.
    let patch = pattern(32 << 10, 5);
    data[6 * MIB..6 * MIB + patch.len()].copy_from_slice(&patch);
    std::fs::write(&dst, &data)?;
    let sent_before = num(&p, "bytes_sent_total");
    let r = c
        .post(
            leader,
            "/drplane/v1/pairs/p1/actions",
            &json!({"reinit": {}}),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text);
    let job_id = r.body["job"]["job_id"].as_str().context("job")?.to_string();
    let job = wait_job(&mut c, &job_id, Duration::from_secs(60)).await?;
    assert_eq!(job["status"], "SUCCESS", "{job}");
    let p = wait_pair(&mut c, "p1", "active again", Duration::from_secs(10), |p| {
        p["state"] == "active"
    })
    .await?;
    assert!(
        std::fs::read(&src)? == data,
        "the old primary did not get the changes"
    );
    let reinit_sent = num(&p, "bytes_sent_total") - sent_before;
    assert!(
        reinit_sent < (DISK / 2) as u64,
        "reinit sent {reinit_sent} bytes for a 32 KiB change of an 8 MiB disk"
    );

    // Refusals: an unknown action is a 400, an unknown pair a 404.
    let r = c
        .post(
            leader,
            "/drplane/v1/pairs/p1/actions",
            &json!({"explode": {}}),
        )
        .await?;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = c.get(leader, "/drplane/v1/pairs/nope").await?;
    assert_eq!(r.status, 404, "{}", r.text);

    // Delete with the target: the pair is gone and h1's copy removed.
    let r = c
        .request(
            leader,
            reqwest::Method::DELETE,
            "/drplane/v1/pairs/p1?delete_target=true",
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text);
    let job_id = r.body["job"]["job_id"].as_str().context("job")?.to_string();
    let job = wait_job(&mut c, &job_id, Duration::from_secs(60)).await?;
    assert_eq!(job["status"], "SUCCESS", "{job}");
    let r = c.get(leader, "/drplane/v1/pairs/p1").await?;
    assert_eq!(r.status, 404, "{}", r.text);
    if src.exists() {
        return Err(anyhow!("the target copy {} is still there", src.display()));
    }
    Ok(())
}
