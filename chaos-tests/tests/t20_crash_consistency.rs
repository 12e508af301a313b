//! Crash consistency: nodes killed with SIGKILL at random instants during a stream of
//! writes restart holding exactly a prefix of the committed history (no gaps, no
//! duplicates), and once they rejoin nothing acknowledged is missing anywhere.
//!
//! The writer is sequential and retries an ambiguous write with the same Idempotency-Key
//! until it gets a definite answer, so the committed history is exactly w-00000, w-00001, …
//! in order, and any node's state must be {w-0 … w-k} for some k.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos_tests::Cluster;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Slower elections for CI: see [`chaos_tests::SLOW_ELECTIONS`].
const TIMING: &[&str] = chaos_tests::SLOW_ELECTIONS;

fn name(i: u64) -> String {
    format!("w-{i:05}")
}

/// Sites named w-* on a node, checked to be exactly a prefix w-0..w-k; returns k+1.
fn prefix_len(names: &[String]) -> Result<u64, String> {
    let ws: Vec<&String> = names.iter().filter(|n| n.starts_with("w-")).collect();
    let set: BTreeSet<&String> = ws.iter().copied().collect();
    if set.len() != ws.len() {
        return Err(format!("duplicates in {ws:?}"));
    }
    for (i, n) in ws.iter().enumerate() {
        if **n != name(i as u64) {
            return Err(format!("gap: position {i} holds {n}"));
        }
    }
    Ok(ws.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_nodes_restart_with_a_prefix_and_lose_nothing_acknowledged() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("DRPLANE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261127);
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c = Cluster::start(&["site-a", "site-b", "site-c"], TIMING).await?;
    let urls: Vec<String> = c.ids().iter().map(|id| c.url(*id)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let stop = stop.clone();
        let acked = acked.clone();
        let http = c.http.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut target = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("crash-{i}");
                // Retry this write until its outcome is definite.
                loop {
                    let url = format!("{}/drplane/v1/sites", urls[target % urls.len()]);
                    let res = http
                        .post(url)
                        .header("Idempotency-Key", &key)
                        .timeout(Duration::from_secs(8))
                        .json(&json!({"name": name(i), "description": "x".repeat(64)}))
                        .send()
                        .await;
                    match res {
                        Ok(r) if r.status().as_u16() == 201 => break,
                        Ok(r) if r.status().as_u16() == 503 => {}
                        Ok(r) => {
                            let s = r.status();
                            let t = r.text().await.unwrap_or_default();
                            return Err(anyhow::anyhow!("write {i}: unexpected {s}: {t}"));
                        }
                        Err(_) => {}
                    }
                    target += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                acked.store(i + 1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<u64, anyhow::Error>(i)
        })
    };

    let mut c = c;
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..700))).await;
        let victim = c.ids()[rng.gen_range(0..3)];
        c.kill(victim)?;
        let acked_at_kill = acked.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..500))).await;
        c.restart(victim)?;
        c.wait_live(victim, Duration::from_secs(20)).await?;
        // Before it rejoins: whatever it holds is a prefix of the history.
        let names = c.site_names(victim, "stale").await?;
        let k =
            prefix_len(&names).map_err(|e| anyhow::anyhow!("round {round}, node {victim}: {e}"))?;
        eprintln!(
            "round {round}: killed node {victim} with {acked_at_kill} acked; restarted holding {k}"
        );
        c.wait_ready(victim, Duration::from_secs(30)).await?;
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.await??;
    assert!(
        written >= 10,
        "the writer made too little progress: {written}"
    );

    // Every node converges on the same prefix, holding every acknowledged write.
    let acked = acked.load(Ordering::Relaxed);
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let want = c.site_names(leader, "linearizable").await?;
    let k = prefix_len(&want).map_err(|e| anyhow::anyhow!("leader: {e}"))?;
    assert!(
        k >= acked,
        "acknowledged {acked} writes but the cluster holds {k}"
    );
    for id in c.ids() {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = c.site_names(id, "stale").await?;
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} holds {} of {}",
                got.len(),
                want.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("{acked} acknowledged writes, {k} committed, identical on every node");
    Ok(())
}
