//! A full disk on one node: node 3 of three keeps its data on a 256 MiB tmpfs that is
//! filled to the last byte while clients write, then freed. The cluster must keep taking
//! writes through the other two, the history must stay linearizable, and once the disk has
//! room again node 3 must catch up (if it exited, after a restart) so that every node's
//! state is identical.

use std::time::Duration;

use chaos_tests::chaos::{self, Fault, RunConfig, Schedule, Topology};
use chaos_tests::net::Net;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_filled_up_catches_up_once_it_has_room() -> anyhow::Result<()> {
    Net::available().map_err(|e| anyhow::anyhow!("chaos tests need root: {e}"))?;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8_3001);
    let mut cfg = RunConfig::new(
        "disk-full",
        seed,
        Topology::ThreeSites,
        Duration::from_secs(12),
    );
    cfg.schedule = Schedule::Cycle;
    cfg.replay = Some(format!(
        "CHAOS_SEED={seed} cargo test -p chaos-tests --test t83_disk_full"
    ));
    cfg.hold_ms = (1500, 2500);
    cfg.faults = vec![Fault::DiskFull];
    let r = chaos::run(cfg).await?;
    assert_eq!(r.violations(), 0, "{}", r.describe());
    assert!(
        r.faults.get("disk-full").copied().unwrap_or(0) >= 2,
        "{}",
        r.describe()
    );
    Ok(())
}
