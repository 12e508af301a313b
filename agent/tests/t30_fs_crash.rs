//! A sync interrupted at any point leaves the target's previous consistent copy or the new
//! one, never a mix, checked by digest after reopening the target agent.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use drplane_agent::{
    CancellationToken, CrashPoint, Digest, Driver, DriverError, SyncRequest, VolumeKind, WriteOp,
};

const SIZE: u64 = 8 * MIB;
/// Small blocks: more records, more places to crash.
const BS: u32 = 64 << 10;

fn req(src: &Agent, vol: &str) -> SyncRequest {
    let mut r = SyncRequest::new(src.endpoint(), vol, vol);
    r.block_size = Some(BS);
    r
}

/// Source at v1, target synced to v1, source moved on to v2 (changed blocks and a larger
/// size). Returns (v1, v2) digests.
async fn setup(src: &Agent, dst: &Agent) -> (Digest, Digest) {
    src.disk("v", SIZE, false).await;
    fill_image(&src.path("v"), SIZE, 11);
    dst.disk("v", SIZE, true).await;
    dst.driver
        .sync_from(&req(src, "v"), None, CancellationToken::new())
        .await
        .unwrap();
    let v1 = src.driver.checksum("v").await.unwrap();
    assert_eq!(dst.driver.checksum("v").await.unwrap(), v1);
    for i in 0..24u64 {
        let data = vec![(i as u8).wrapping_mul(37) ^ 0x5a; 8192];
        src.driver
            .write(
                "v",
                WriteOp::At {
                    offset: i * 333_333,
                    data: &data,
                },
            )
            .await
            .unwrap();
    }
    // Grow the image too: the apply must also set the size.
    src.driver
        .write(
            "v",
            WriteOp::At {
                offset: SIZE + 1000,
                data: b"tail",
            },
        )
        .await
        .unwrap();
    let v2 = src.driver.checksum("v").await.unwrap();
    assert_ne!(v1, v2);
    (v1, v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_crash_points_leave_old_or_new_copy() {
    // (crash point, whether the new copy must be there after reopening)
    let mut cases = vec![
        (CrashPoint::BeforeCommit, false),
        (CrashPoint::AfterCommit, true),
    ];
    for n in [0, 1, 5, 12, 23] {
        cases.push((CrashPoint::MidApply(n), true));
    }
    for (point, new) in cases {
        let src = Agent::start().await;
        let dst = Agent::start().await;
        let (v1, v2) = setup(&src, &dst).await;
        dst.driver.inject_crash(Some(point));
        let r = dst
            .driver
            .sync_from(&req(&src, "v"), None, CancellationToken::new())
            .await;
        assert!(
            matches!(r, Err(DriverError::Injected(_))),
            "{point:?}: {r:?}"
        );
        let jpath = dst.path("v").with_file_name("journal");
        assert!(jpath.exists(), "{point:?}: the journal stays for recovery");
        let dst = dst.reopen().await;
        assert!(!jpath.exists(), "{point:?}: recovery removed the journal");
        let got = dst.driver.checksum("v").await.unwrap();
        let want = if new { v2 } else { v1 };
        assert_eq!(got, want, "{point:?}: after reopening");
        assert!(dst.driver.volume("v").await.unwrap().fenced);
        // And the next sync completes the job either way.
        dst.driver
            .sync_from(&req(&src, "v"), None, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(dst.driver.checksum("v").await.unwrap(), v2, "{point:?}");
    }
}

/// The first (full) sync writes a new file: a crash before its rename leaves the empty
/// replica, not a half-written one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_crash_before_shadow_rename_keeps_empty_copy() {
    let src = Agent::start().await;
    let dst = Agent::start().await;
    src.disk("v", SIZE, false).await;
    fill_image(&src.path("v"), SIZE, 3);
    dst.disk("v", SIZE, true).await;
    let empty = dst.driver.checksum("v").await.unwrap();
    dst.driver.inject_crash(Some(CrashPoint::BeforeRename));
    let r = dst
        .driver
        .sync_from(&req(&src, "v"), None, CancellationToken::new())
        .await;
    assert!(matches!(r, Err(DriverError::Injected(_))), "{r:?}");
    let dst = dst.reopen().await;
    assert_eq!(dst.driver.checksum("v").await.unwrap(), empty);
    assert!(!dst.path("v").with_file_name("data.sync-new").exists());
    dst.driver
        .sync_from(&req(&src, "v"), None, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        dst.driver.checksum("v").await.unwrap(),
        src.driver.checksum("v").await.unwrap()
    );
}

/// Interrupt a running sync three ways, at several moments: drop its future, cancel it,
/// kill the source's server. The target keeps v1, before and after reopening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t32_interrupted_sync_keeps_previous_copy() {
    for (how, after_ms) in [
        ("drop", 30u64),
        ("drop", 150),
        ("drop", 400),
        ("cancel", 100),
        ("cancel", 300),
        ("kill-source", 120),
        ("kill-source", 350),
        // Drop the future once progress shows this many 64 KiB blocks received.
        ("drop-after-blocks", 3),
        ("drop-after-blocks", 12),
    ] {
        let mut src = Agent::start().await;
        let dst = Agent::start().await;
        let (v1, v2) = setup(&src, &dst).await;
        // Slow the sync down so that it is interrupted mid-stream: the changed blocks
        // (~1.6 MiB) take ~0.8 s at 2 MiB/s.
        let mut r = req(&src, "v");
        r.bwlimit = Some(2 * MIB);
        let cancel = CancellationToken::new();
        let received = Arc::new(tokio::sync::Notify::new());
        let progress: Option<drplane_agent::ProgressFn> = (how == "drop-after-blocks").then(|| {
            let n = received.clone();
            let f: drplane_agent::ProgressFn = Arc::new(move |p: drplane_agent::SyncProgress| {
                if p.bytes_sent > after_ms * BS as u64 {
                    n.notify_one();
                }
            });
            f
        });
        let fut = dst.driver.sync_from(&r, progress, cancel.clone());
        let outcome = match how {
            "drop-after-blocks" => tokio::select! {
                r = fut => r.map(|_| ()),
                _ = received.notified() => Err(DriverError::Cancelled),
            },
            "drop" => tokio::time::timeout(Duration::from_millis(after_ms), fut)
                .await
                .map(|r| r.map(|_| ()))
                .unwrap_or(Err(DriverError::Cancelled)),
            "cancel" => {
                let c = cancel.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    c.cancel();
                });
                fut.await.map(|_| ())
            }
            _ => {
                let server = src.server.take().unwrap();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    server.shutdown().await;
                });
                fut.await.map(|_| ())
            }
        };
        assert!(
            outcome.is_err(),
            "{how}@{after_ms}ms finished: make the sync slower"
        );
        // Same process: the next operation waits for the aborted sync to clean up.
        let got = dst.driver.checksum("v").await.unwrap();
        assert_eq!(got, v1, "{how}@{after_ms}ms: {outcome:?}");
        let dst = dst.reopen().await;
        assert_eq!(
            dst.driver.checksum("v").await.unwrap(),
            v1,
            "{how}@{after_ms}ms reopened"
        );
        if how == "kill-source" {
            src = src.reopen().await;
        }
        dst.driver
            .sync_from(&req(&src, "v"), None, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(dst.driver.checksum("v").await.unwrap(), v2);
    }
}

/// A share whose sync dies in the middle of applying: replay on reopen finishes the
/// deletions and writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t33_share_crash_mid_apply_replays() {
    let src = Agent::start().await;
    let dst = Agent::start().await;
    src.driver
        .create_volume(&spec("s", VolumeKind::Share, 0, false))
        .await
        .unwrap();
    dst.driver
        .create_volume(&spec("s", VolumeKind::Share, 0, true))
        .await
        .unwrap();
    for i in 0..6 {
        let data = vec![i as u8; 200_000];
        src.driver
            .write(
                "s",
                WriteOp::File {
                    path: &format!("d{}/f{i}", i % 2),
                    data: &data,
                },
            )
            .await
            .unwrap();
    }
    dst.sync_from(&src, "s", "s").await;
    let v1 = src.driver.checksum("s").await.unwrap();
    src.driver
        .write("s", WriteOp::Remove { path: "d0" })
        .await
        .unwrap();
    for i in 0..4 {
        let data = vec![0xa0 + i as u8; 300_000];
        src.driver
            .write(
                "s",
                WriteOp::File {
                    path: &format!("d1/g{i}"),
                    data: &data,
                },
            )
            .await
            .unwrap();
    }
    let v2 = src.driver.checksum("s").await.unwrap();
    let mut r = req(&src, "s");
    r.bwlimit = None;
    dst.driver.inject_crash(Some(CrashPoint::MidApply(3)));
    let res = dst
        .driver
        .sync_from(&r, None, CancellationToken::new())
        .await;
    assert!(matches!(res, Err(DriverError::Injected(_))), "{res:?}");
    let dst = dst.reopen().await;
    let got = dst.driver.checksum("s").await.unwrap();
    assert_ne!(got, v1);
    assert_eq!(got, v2);
    assert!(!dst.path("s").join("d0").exists());
}
