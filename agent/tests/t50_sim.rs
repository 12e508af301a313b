//! The sim driver: latency and failures deterministic by seed, syncs that move deltas,
//! and a thousand agents in one process.

use std::sync::Arc;
use std::time::Duration;

use drplane_agent::sim::SimOp;
use drplane_agent::{
    CancellationToken, Driver, DriverError, SimConfig, SimDriver, SimNetwork, SyncRequest,
    VolumeKind, VolumeSpec, WriteOp,
};

fn spec(id: &str, read_only: bool) -> VolumeSpec {
    VolumeSpec {
        id: id.into(),
        kind: VolumeKind::Disk,
        pool: "default".into(),
        size_bytes: 64 << 20,
        reserve: false,
        read_only,
    }
}

/// Run a fixed script of operations; return what each did and when it ended.
async fn script(seed: u64) -> (Vec<SimOp>, Vec<(bool, Duration)>) {
    let cfg = SimConfig {
        host: "h1".into(),
        seed,
        latency: Duration::from_millis(10),
        jitter: Duration::from_millis(20),
        failure_rate: 0.3,
        record_ops: true,
        ..SimConfig::default()
    };
    let d = SimDriver::new(cfg, SimNetwork::new());
    let start = tokio::time::Instant::now();
    let mut outcomes = Vec::new();
    for i in 0..40 {
        let id = format!("v{}", i % 5);
        let r = match i % 4 {
            0 => d.create_volume(&spec(&id, false)).await.map(|_| ()),
            1 => {
                d.write(
                    &id,
                    WriteOp::At {
                        offset: 0,
                        data: b"x",
                    },
                )
                .await
            }
            2 => d.fence(&id).await,
            _ => d.promote(&id).await,
        };
        outcomes.push((matches!(r, Err(DriverError::Injected(_))), start.elapsed()));
    }
    (d.op_log(), outcomes)
}

#[tokio::test(start_paused = true)]
async fn t50_sim_latency_and_failures_are_deterministic_by_seed() {
    let (log_a, out_a) = script(7).await;
    let (log_b, out_b) = script(7).await;
    let (log_c, out_c) = script(8).await;
    assert_eq!(log_a, log_b);
    assert_eq!(
        out_a, out_b,
        "same seed, same failures at the same instants"
    );
    assert_ne!(out_a, out_c, "another seed, another run");
    let _ = log_c;
    // Latency within [latency, latency + jitter) and, with the paused clock, exactly the
    // drawn delays add up.
    let total: Duration = log_a.iter().map(|o| o.delay).sum();
    assert!(log_a
        .iter()
        .all(|o| o.delay >= Duration::from_millis(10) && o.delay <= Duration::from_millis(30)));
    assert_eq!(out_a.last().unwrap().1, total);
    // About 30% of the operations failed.
    let failed = log_a.iter().filter(|o| o.failed).count();
    assert!((5..=20).contains(&failed), "{failed} of 40 failed");
}

#[tokio::test(start_paused = true)]
async fn t51_sim_sync_moves_deltas_at_the_link_rate() {
    let net = SimNetwork::new();
    let cfg = |host: &str| SimConfig {
        host: host.into(),
        latency: Duration::from_millis(5),
        bandwidth: 100 << 20,
        ..SimConfig::default()
    };
    let a = SimDriver::new(cfg("a"), net.clone());
    let b = SimDriver::new(cfg("b"), net.clone());
    let srv = a
        .serve_sync_source("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(srv.endpoint(), "sim://a");
    a.create_volume(&spec("v", false)).await.unwrap();
    b.create_volume(&spec("v", true)).await.unwrap();
    a.write(
        "v",
        WriteOp::At {
            offset: 0,
            data: &[1; 10],
        },
    )
    .await
    .unwrap();
    let req = SyncRequest::new("sim://a", "v", "v");
    let t0 = tokio::time::Instant::now();
    let full = b
        .sync_from(&req, None, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(full.bytes_sent, 64 << 20);
    // 5 ms latency + 64 MiB at 100 MiB/s.
    assert_eq!(t0.elapsed(), Duration::from_millis(5 + 640));
    assert_eq!(
        a.checksum("v").await.unwrap(),
        b.checksum("v").await.unwrap()
    );

    a.write(
        "v",
        WriteOp::At {
            offset: 5 << 20,
            data: &[2; 10],
        },
    )
    .await
    .unwrap();
    let mut req2 = req.clone();
    req2.bwlimit = Some(1 << 20);
    let t0 = tokio::time::Instant::now();
    let inc = b
        .sync_from(&req2, None, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(inc.bytes_sent, 1 << 20, "one block");
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(5 + 1000),
        "bwlimit 1 MiB/s"
    );
    assert_eq!(
        a.checksum("v").await.unwrap(),
        b.checksum("v").await.unwrap()
    );

    // Writable targets are refused; fenced volumes refuse writes.
    let r = a
        .sync_from(
            &SyncRequest::new("sim://b", "v", "v"),
            None,
            CancellationToken::new(),
        )
        .await;
    assert!(matches!(r, Err(DriverError::TargetWritable(_))), "{r:?}");
    assert!(matches!(
        b.write(
            "v",
            WriteOp::At {
                offset: 0,
                data: b"x"
            }
        )
        .await,
        Err(DriverError::Fenced(_))
    ));
    drop(srv);
    let r = b.sync_from(&req, None, CancellationToken::new()).await;
    assert!(matches!(r, Err(DriverError::Remote { .. })), "{r:?}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn t52_thousand_sim_agents_in_one_process() {
    let net = SimNetwork::new();
    let agents: Vec<SimDriver> = (0..1000)
        .map(|i| {
            SimDriver::new(
                SimConfig {
                    host: format!("h{i}"),
                    seed: i,
                    latency: Duration::from_millis(2),
                    jitter: Duration::from_millis(3),
                    failure_rate: 0.01,
                    ..SimConfig::default()
                },
                net.clone(),
            )
        })
        .collect();
    let mut servers = Vec::new();
    for a in &agents {
        servers.push(
            a.serve_sync_source("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    let agents = Arc::new(agents);
    let mut tasks = Vec::new();
    for i in 0..1000usize {
        let agents = agents.clone();
        tasks.push(tokio::spawn(async move {
            let (src, dst) = (&agents[i], &agents[(i + 1) % 1000]);
            let id = format!("v{i}");
            for _ in 0..5 {
                if src.create_volume(&spec(&id, false)).await.is_ok() {
                    break;
                }
            }
            for _ in 0..5 {
                if dst.create_volume(&spec(&id, true)).await.is_ok() {
                    break;
                }
            }
            let req = SyncRequest::new(format!("sim://h{i}"), &id, &id);
            for _ in 0..5 {
                if dst
                    .sync_from(&req, None, CancellationToken::new())
                    .await
                    .is_ok()
                {
                    return true;
                }
            }
            false
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap() as usize;
    }
    assert_eq!(ok, 1000);
    let inv = agents[3].inventory().await.unwrap();
    assert_eq!(inv.volumes.len(), 2);
}
