//! Short chaos profile, 5 nodes in 3 sites laid out 2-2-1: while eight clients create,
//! delete and read sites through every node, the nemesis loses a whole 2-node site at once,
//! makes a bridge partition, splits a minority off, kills the leader, and adds then removes
//! a voter through the CLI — each once, in a seeded order. Then everything heals and the
//! history must be linearizable, no acknowledged write lost, every member's state identical,
//! and the cluster back to acknowledging writes after every fault.
//!
//! `CHAOS_SEED=<n>` replays another schedule; a failing run prints where it saved the
//! history, the seed and the node logs.

use std::time::Duration;

use chaos_tests::chaos::{self, Fault, RunConfig, Schedule, Topology};
use chaos_tests::net::Net;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_survive_site_loss_bridges_and_membership_changes() -> anyhow::Result<()> {
    Net::available().map_err(|e| anyhow::anyhow!("chaos tests need root: {e}"))?;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8_1001);
    let mut cfg = RunConfig::new(
        "ci-five",
        seed,
        Topology::FiveNodes221,
        Duration::from_secs(35),
    );
    cfg.schedule = Schedule::Cycle;
    cfg.replay = Some(format!(
        "CHAOS_SEED={seed} cargo test -p chaos-tests --test t81_chaos_five_nodes"
    ));
    cfg.hold_ms = (800, 2000);
    cfg.faults = vec![
        Fault::SiteLoss,
        Fault::Bridge,
        Fault::MajorityMinority,
        Fault::KillLeader,
        Fault::MembershipChange,
        Fault::OneWayCut,
        Fault::MembershipChange,
    ];
    let r = chaos::run(cfg).await?;
    assert_eq!(r.violations(), 0, "{}", r.describe());
    assert!(r.inconclusive.is_empty(), "{}", r.describe());
    for kind in ["site-loss", "bridge", "membership-change"] {
        assert!(
            r.faults.get(kind).copied().unwrap_or(0) >= 1,
            "{kind} was not injected: {}",
            r.describe()
        );
    }
    assert!(
        r.fault_errors.is_empty(),
        "faults not injected as planned: {}",
        r.describe()
    );
    assert!(
        r.ops.ok >= 200,
        "the clients made too little progress: {}",
        r.describe()
    );
    Ok(())
}
