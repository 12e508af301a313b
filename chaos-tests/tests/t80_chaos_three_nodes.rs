//! Short chaos profile, 3 nodes in 3 sites: while eight clients create, delete and read
//! sites through every node and a ninth creates jobs that two `sim` agents run, the
//! nemesis kills and pauses the leader and random nodes, isolates the leader, splits a
//! minority off, cuts links in one direction, slows links and kills an agent — each fault
//! once, in a seeded order, then again. (The full disk has its own test, `t83_disk_full`.)
//! Then everything heals and the history must be linearizable, no acknowledged write
//! lost, every node's state identical, every acknowledged job ended SUCCESS or FAIL, and
//! the cluster back to acknowledging writes after every fault.
//!
//! `CHAOS_SEED=<n>` replays another schedule; a failing run prints where it saved the
//! history, the seed and the node logs.

use std::time::Duration;

use chaos_tests::chaos::{self, Fault, RunConfig, Schedule, Topology};
use chaos_tests::net::Net;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_survive_kills_pauses_and_partitions() -> anyhow::Result<()> {
    Net::available().map_err(|e| anyhow::anyhow!("chaos tests need root: {e}"))?;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8_0001);
    let mut cfg = RunConfig::new(
        "ci-three",
        seed,
        Topology::ThreeSites,
        Duration::from_secs(40),
    );
    cfg.schedule = Schedule::Cycle;
    cfg.replay = Some(format!(
        "CHAOS_SEED={seed} cargo test -p chaos-tests --test t80_chaos_three_nodes"
    ));
    cfg.hold_ms = (800, 2000);
    cfg.faults = vec![
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::PauseLeader,
        Fault::PauseRandom,
        Fault::IsolateLeader,
        Fault::MajorityMinority,
        Fault::OneWayCut,
        Fault::SlowLink,
        Fault::KillAgent,
    ];
    cfg.agents = true;
    let r = chaos::run(cfg).await?;
    assert_eq!(r.violations(), 0, "{}", r.describe());
    assert!(r.inconclusive.is_empty(), "{}", r.describe());
    let injected: u64 = r.faults.values().sum();
    assert!(injected >= 6, "too few faults injected: {}", r.describe());
    assert!(r.jobs >= 10, "too few jobs acknowledged: {}", r.describe());
    assert!(
        r.ops.ok >= 200,
        "the clients made too little progress: {}",
        r.describe()
    );
    Ok(())
}
