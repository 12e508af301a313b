//! api/ERRORS.md: `503 DRP-4001` (ClusterUnavailable) means the request was not applied,
//! `DRP-4002` that it may have been. This run takes DRP-4001 at its word (a write that got
//! it must never take effect) through the 5-node faults that showed otherwise: with seed
//! 81001 a follower whose Forward(Propose) to the leader timed out — the leader was killed
//! with its site after replicating the entry — answered DRP-4001 to a DELETE that the next
//! leader then committed, and the checker found the history not linearizable.

use std::time::Duration;

use chaos_tests::chaos::{self, Fault, RunConfig, Schedule, Topology};
use chaos_tests::net::Net;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_answered_cluster_unavailable_never_takes_effect() -> anyhow::Result<()> {
    Net::available().map_err(|e| anyhow::anyhow!("chaos tests need root: {e}"))?;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8_1001);
    let mut cfg = RunConfig::new(
        "strict-4001",
        seed,
        Topology::FiveNodes221,
        Duration::from_secs(40),
    );
    cfg.schedule = Schedule::Cycle;
    cfg.hold_ms = (800, 2000);
    cfg.faults = vec![
        Fault::SiteLoss,
        Fault::KillLeader,
        Fault::IsolateLeader,
        Fault::Bridge,
    ];
    cfg.workload.unavailable_is_definite = true;
    cfg.workload.one_shot_clients = 6;
    cfg.replay = Some(format!(
        "CHAOS_SEED={seed} cargo test -p chaos-tests --test t84_unavailable_means_not_applied"
    ));
    let r = chaos::run(cfg).await?;
    assert_eq!(r.violations(), 0, "{}", r.describe());
    assert!(
        r.ops.failed > 0,
        "no write was refused, nothing was checked: {}",
        r.describe()
    );
    Ok(())
}
