//! Long chaos profile (ignored by default; see chaos-tests/README.md):
//!
//! ```sh
//! CHAOS_DURATION_SECS=1800 cargo test -p chaos-tests --test t89_chaos_long -- \
//!     --ignored --nocapture chaos_long
//! ```
//!
//! Runs one chaos run after another for `CHAOS_DURATION_SECS` (default 600), alternating
//! 3 nodes in 3 sites and 5 nodes in 2-2-1, each run `CHAOS_RUN_SECS` of faults (default
//! 120) picked at random from `CHAOS_FAULTS` (comma-separated names; default every fault but
//! disk-full, whose known bug is described in t83_disk_full), seeds `CHAOS_SEED` (default:
//! from the clock) plus the run's number. Prints every run and then a summary table — runs,
//! faults injected per kind, operations, violations — and fails if any run found a
//! violation. With `kill-agent` among the faults, runs have two `sim` agents and a client
//! creating jobs, and every acknowledged job must end. A failing run's evidence (history, seed, fault log, node logs) is saved under
//! `$CHAOS_ARTIFACTS_DIR` (default `<tmp>/drplane-chaos`).
//!
//! `replay` runs one run again from the `seed.txt` of a failure:
//!
//! ```sh
//! CHAOS_SEED=… CHAOS_FAULTS=… CHAOS_TOPOLOGY=… CHAOS_DURATION_SECS=… \
//!     cargo test -p chaos-tests --test t89_chaos_long -- --ignored --nocapture replay
//! ```

use std::time::{Duration, Instant};

use chaos_tests::chaos::{self, Fault, RunConfig, Schedule, Summary, Topology};
use chaos_tests::net::Net;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

fn faults_from_env() -> anyhow::Result<Vec<Fault>> {
    match std::env::var("CHAOS_FAULTS") {
        Ok(list) => Fault::parse_list(&list),
        Err(_) => Ok(Fault::ALL.to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long profile: run with --ignored (CHAOS_DURATION_SECS, CHAOS_RUN_SECS, CHAOS_SEED, CHAOS_FAULTS)"]
async fn chaos_long() -> anyhow::Result<()> {
    Net::available().map_err(|e| anyhow::anyhow!("chaos tests need root: {e}"))?;
    let total = Duration::from_secs(env_u64("CHAOS_DURATION_SECS").unwrap_or(600));
    let per_run = Duration::from_secs(env_u64("CHAOS_RUN_SECS").unwrap_or(120));
    let base_seed = env_u64("CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let faults = faults_from_env()?;
    eprintln!(
        "long chaos profile: {total:?} in runs of {per_run:?}, base seed {base_seed}, faults {}",
        faults.iter().map(Fault::name).collect::<Vec<_>>().join(",")
    );
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut errors = Vec::new();
    let mut n = 0u64;
    let mut failed_in_a_row = 0;
    while started.elapsed() + per_run / 2 < total || n == 0 {
        let topology = if n.is_multiple_of(2) {
            Topology::ThreeSites
        } else {
            Topology::FiveNodes221
        };
        let left = total.saturating_sub(started.elapsed());
        let mut cfg = RunConfig::new(
            &format!("long-{n}"),
            base_seed + n,
            topology,
            per_run.min(left).max(Duration::from_secs(20)),
        );
        cfg.schedule = Schedule::Random;
        cfg.faults = faults.clone();
        cfg.agents = faults.contains(&Fault::KillAgent);
        match chaos::run(cfg).await {
            Ok(r) => {
                failed_in_a_row = 0;
                summary.add(&r);
            }
            Err(e) => {
                failed_in_a_row += 1;
                summary.runs += 1;
                summary.failed_runs += 1;
                errors.push(format!("run {n} (seed {}): {e:#}", base_seed + n));
            }
        }
        n += 1;
        // Three runs in a row that could not even complete: the harness or the binary is
        // broken; stop instead of failing for the rest of the time.
        if failed_in_a_row >= 3 {
            eprintln!("three runs failed to complete in a row; stopping");
            break;
        }
    }
    summary.elapsed = started.elapsed();
    eprintln!("\nlong chaos profile summary (base seed {base_seed}):\n{summary}");
    for e in &errors {
        eprintln!("error: {e}");
    }
    assert_eq!(summary.violations, 0, "violations found:\n{summary}");
    assert!(errors.is_empty(), "runs failed: {errors:?}");
    assert_eq!(summary.inconclusive, 0, "undecided keys:\n{summary}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "replays one run: CHAOS_SEED (required), CHAOS_FAULTS, CHAOS_TOPOLOGY, CHAOS_DURATION_SECS"]
async fn replay() -> anyhow::Result<()> {
    Net::available().map_err(|e| anyhow::anyhow!("chaos tests need root: {e}"))?;
    let seed = env_u64("CHAOS_SEED").ok_or_else(|| anyhow::anyhow!("set CHAOS_SEED"))?;
    let topology = match std::env::var("CHAOS_TOPOLOGY") {
        Ok(t) => Topology::parse(&t).ok_or_else(|| anyhow::anyhow!("unknown topology {t}"))?,
        Err(_) => Topology::ThreeSites,
    };
    let secs = env_u64("CHAOS_DURATION_SECS").unwrap_or(60);
    let mut cfg = RunConfig::new("replay", seed, topology, Duration::from_secs(secs));
    cfg.faults = faults_from_env()?;
    cfg.agents = cfg.faults.contains(&Fault::KillAgent);
    cfg.schedule = Schedule::Random;
    let r = chaos::run(cfg).await?;
    assert_eq!(r.violations(), 0, "{}", r.describe());
    Ok(())
}
